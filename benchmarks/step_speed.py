"""Step speed of multirate training against plain optax, in one process run.

For a ResNet-style conv net and a transformer encoder, each with a small
classification head (the fast part), this measures the median time per step
of: a full step (plain optax, gradients of all parameters), a fast-only step
(plain optax, gradients and updates of the head only), and multirate steps with
``'cond'`` and ``'host'`` dispatch for k in {2, 5, 10}. Multirate runs whole
cycles of k steps, so its time per step is the average over a cycle.

  speedup    = t_full / t_step
  ideal      = t_full / ((t_full + (k - 1) t_fast) / k)
  efficiency = speedup / ideal
  all-active / plain = t(multirate's slow-step program) / t_full, the
               timetable's overhead over plain optax when every leaf trains
  faults     = minor page faults per step: on CPU, memory that the allocator
               handed back to the system and the step touches afresh (the
               'cond' program's temporaries are sized by its full branch);
               compare with an allocator that keeps its memory, e.g.
               LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=retain:true,...

Each row also gives the peak memory of its programs from XLA's analysis of the
compiled program (arguments + outputs - donated reuse + temporaries): the one
``lax.switch`` program for ``'cond'``, the larger phase program for
``'host'``, and either against the full phase's (phase 0) program. The Linen
and NNX train steps run on the same model beside the core one (``'auto'``
dispatch), as a ratio of their time per step to the core step's.

The lower bound of each program (``--bounds``, by default on): the forward pass
with the backward pass of the phase's active leaves, and the optimizer update
of those leaves, each compiled alone (:func:`multirate_optax.profile_splits`);
the overhead is a program's time over that sum, minus 1, for the full phase
and for the fast phase with ``'host'`` dispatch and inside the ``lax.switch``
program (``'cond'``).

Three rates (``--groups``, on the transformer): :func:`multirate_optax.
multirate_groups` with the head every step, the top two encoder layers every
2 steps and the rest every 6, against its ideal ``sum_phases share *
t_phase`` (``t_phase`` a plain optax step of the phase's active modules
only); and against the same sum over its own phase programs, each run alone,
which isolates what switching programs costs.

Run from the repository root::

  python -m benchmarks.step_speed --quick --json results/step_speed.json

Timings are medians over repeats after warm-up, with the variants' blocks of
steps interleaved so that changes of machine load fall on all of them alike;
on a shared 2-core CPU only the ratios mean much, and ``--clock process`` (CPU time
of this process) moves less with other jobs' load than wall-clock time.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json

PERIODS = (2, 5, 10)
LEARNING_RATE, MOMENTUM = 0.01, 0.9
# Wall-clock time, or the CPU time of this process (all its threads): on a
# CPU shared with other jobs the latter moves much less with their load.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
CLOCK = "wall"
MIB = 2.0 ** 20


def peak_bytes(lowered: jax.stages.Lowered) -> int:
  """Peak memory of a program from XLA's analysis of the compiled program.

  Arguments and outputs, less the outputs that reuse donated arguments'
  buffers, plus the temporary buffers.
  """
  m = lowered.compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes + m.temp_size_in_bytes)


class ResidualBlock(nn.Module):
  features: int
  stride: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
    y = nn.relu(nn.LayerNorm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.LayerNorm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet: stem, three stages of two residual blocks, a dense head."""

  num_classes: int = 10

  def setup(self):
    self.stem = nn.Conv(32, (3, 3), use_bias=False)
    self.stages = [
        nn.Sequential([ResidualBlock(f, s), ResidualBlock(f, 1)])
        for f, s in ((32, 1), (64, 2), (128, 2))]
    self.head = nn.Dense(self.num_classes)

  def __call__(self, x):
    x = nn.relu(self.stem(x))
    for stage in self.stages:
      x = stage(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class EncoderLayer(nn.Module):
  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x))
    y = nn.Dense(4 * self.d_model)(nn.LayerNorm()(x))
    return x + nn.Dense(self.d_model)(nn.gelu(y))


class Transformer(nn.Module):
  """A pre-norm transformer encoder over tokens, mean-pooled into a dense head."""

  vocab: int = 1000
  length: int = 64
  d_model: int = 128
  heads: int = 4
  layers: int = 4
  num_classes: int = 10

  def setup(self):
    self.embed = nn.Embed(self.vocab, self.d_model)
    self.position = self.param(
        "position", nn.initializers.normal(0.02), (self.length, self.d_model))
    self.encoder = [EncoderLayer(self.d_model, self.heads)
                    for _ in range(self.layers)]
    self.head = nn.Dense(self.num_classes)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position
    for layer in self.encoder:
      x = layer(x)
    return self.head(jnp.mean(x, axis=1))


def make_problem(name: str, batch_size: int, seed: int = 0):
  """Returns (module, params, batch) for model ``name``."""
  rng = np.random.default_rng(seed)
  if name == "resnet":
    module = ResNet()
    inputs = jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32)
  elif name == "transformer":
    module = Transformer()
    inputs = jnp.asarray(rng.integers(0, module.vocab, (batch_size, module.length)))
  else:
    raise ValueError(name)
  labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  params = module.init(jax.random.key(seed), inputs[:1])["params"]
  return module, params, (inputs, labels)


def make_loss(module: nn.Module) -> Callable[..., jax.Array]:
  def loss_fn(params, batch):
    inputs, labels = batch
    logits = module.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn


def plain_step(loss_fn, tx, fast_only: bool):
  """Plain optax: gradients of all parameters, or of the head alone."""
  return subset_step(loss_fn, tx, ("head",) if fast_only else None)


def subset_step(loss_fn, tx, modules: Optional[tuple[str, ...]]):
  """Plain optax on the top-level ``modules`` only (all if ``None``).

  Its optimizer state is ``tx.init`` of those modules' parameters.
  """

  def step(params, opt_state, batch):
    if modules is not None:
      sub_loss = lambda sub: loss_fn({**params, **sub}, batch)
      sub = {name: params[name] for name in modules}
      loss, grads = jax.value_and_grad(sub_loss)(sub)
      updates, opt_state = tx.update(grads, opt_state, sub)
      return ({**params, **optax.apply_updates(sub, updates)}, opt_state,
              loss)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


class Runner:
  """One variant's step and its own copy of the training state.

  ``step(state, batch) -> (state, loss)``; ``arrays(state)`` is what to wait
  for before a block starts (the state itself, by default); ``clock`` times
  the blocks (default the module's ``CLOCK``, ``--clock``).
  """

  def __init__(self, step, state, batch, steps_per_block: int, repeats: int,
               arrays: Callable[[Any], Any] = lambda state: state,
               clock: Optional[Callable[[], float]] = None):
    self.step, self.state, self.batch, self.arrays = step, state, batch, arrays
    self.clock = clock  # None: the module's CLOCK, read at each block.
    self.steps_per_block, self.repeats = steps_per_block, repeats
    self.times: list[float] = []
    self.faults: list[float] = []

  def block(self) -> float:
    """Runs a block of steps; returns the mean time per step.

    Also records the minor page faults per step of the block (memory the
    process touched for the first time since it was mapped).
    """
    jax.block_until_ready(self.arrays(self.state))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    clock = CLOCKS[CLOCK] if self.clock is None else self.clock
    start = clock()
    for _ in range(self.steps_per_block):
      self.state, loss = self.step(self.state, self.batch)
    jax.block_until_ready(loss)
    seconds = clock() - start
    self.faults.append(
        (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        / self.steps_per_block)
    return seconds / self.steps_per_block


def core_runner(step, params, opt_state, batch, steps_per_block, repeats):
  """A runner of ``params, opt_state, loss = step(params, opt_state, batch)``."""

  def run(state, batch):
    *state, loss = step(*state, batch)
    return state, loss

  return Runner(run, (params, opt_state), batch, steps_per_block, repeats)


def linen_runner(module, loss_fn, params, tx, dispatch, batch,
                 steps_per_block, repeats):
  """``mo.linen.train_step`` on a ``TrainState`` of the same model."""
  del module
  step = mo.linen.train_step(loss_fn, dispatch=dispatch, donate=True)
  state = mo.linen.TrainState.create(apply_fn=None, params=params, tx=tx)
  return Runner(step, state, batch, steps_per_block, repeats)


def nnx_runner(module, loss_fn, params, tx, dispatch, batch, steps_per_block,
               repeats):
  """``mo.nnx.train_step`` on the same model, wrapped by ``nnx.bridge``."""
  del loss_fn
  from flax import nnx
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0)).lazy_init(batch[0][:1])
  model_params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(model_params, params)
  nnx.update(model, model_params)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_of_model(model, batch):
    inputs, labels = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model(inputs), labels).mean()

  step = mo.nnx.train_step(loss_of_model, dispatch=dispatch, donate=True)

  def run(state, batch):
    return state, step(*state, batch)

  return Runner(run, (model, optimizer), batch, steps_per_block, repeats,
                arrays=lambda state: nnx.state(state))


def measure(runners: dict[Any, Runner]) -> dict[Any, float]:
  """Median time per step of each runner, with the runners interleaved.

  One warm-up block each first (compiling every program it needs); then each
  repeat runs one block of every runner that still needs one, so that a change
  of machine load falls on all variants alike.
  """
  for runner in runners.values():
    runner.block()
    runner.faults.clear()
  for repeat in range(max(r.repeats for r in runners.values())):
    for runner in runners.values():
      if repeat < runner.repeats:
        runner.times.append(runner.block())
  return {name: statistics.median(r.times) for name, r in runners.items()}


def copy(tree):
  return jax.tree.map(jnp.array, tree)


def bench_model(name: str, batch_size: int, repeats: int, cycles: int,
                dispatches: tuple[str, ...], periods: tuple[int, ...],
                cond_periods: tuple[int, ...], cond_repeats: int,
                flavours: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
  """The multirate rows (core step) and the Linen/NNX step rows of a model."""
  module, params, batch = make_problem(name, batch_size)
  loss_fn = make_loss(module)
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  block = max(periods) * cycles
  runners = {
      "full": core_runner(plain_step(loss_fn, tx, False), copy(params),
                          tx.init(params), batch, block, repeats),
      "fast": core_runner(plain_step(loss_fn, tx, True), copy(params),
                          tx.init({"head": params["head"]}), batch, block, repeats)}

  def multirate_tx(k):
    return mo.multirate(optax.sgd(LEARNING_RATE / k, momentum=MOMENTUM),
                        labels=mo.fast_by_path("^head/"), period=k)

  memory = {"full": peak_bytes(plain_step(loss_fn, tx, False).lower(
      params, tx.init(params), batch))}
  for dispatch in dispatches:
    for k in cond_periods if dispatch == "cond" else periods:
      multi = multirate_tx(k)
      step = mo.train_step(loss_fn, multi, dispatch=dispatch, donate=True)
      state = (params, multi.init(params), batch)
      memory[dispatch, k] = (
          [peak_bytes(step.program(*state, phase=phase)) for phase in (0, 1)],
          peak_bytes(step.program(*state)) if dispatch == "cond" else None)
      runners[dispatch, k] = core_runner(
          step, copy(params), multi.init(params), batch, k * cycles,
          cond_repeats if dispatch == "cond" else repeats)
  # Multirate's all-active phase (its slow step) on every step, against the
  # plain full step: the overhead of the timetable over plain optax.
  k = max(periods)
  multi = multirate_tx(k)
  slow_program = mo.train_step(loss_fn, multi, dispatch="host", donate=True
                               ).program(params, multi.init(params), batch,
                                         phase=0).compile()
  runners["all active"] = core_runner(slow_program, copy(params),
                                      multi.init(params), batch, block,
                                      repeats)
  # The Linen and NNX steps on the same model, with 'auto' dispatch, beside
  # the core step with the same dispatch.
  auto = mo.resolve_dispatch("auto")
  flavour_runners = {"linen": linen_runner, "nnx": nnx_runner}
  for flavour in flavours:
    for k in periods:
      if (auto, k) not in runners:
        runners[auto, k] = core_runner(
            mo.train_step(loss_fn, multirate_tx(k), dispatch=auto,
                          donate=True),
            copy(params), multirate_tx(k).init(params), batch, k * cycles,
            repeats)
      tx_k = multirate_tx(k)
      if flavour == "nnx":
        # nnx.Optimizer labels an nnx.State: the same paths, by filter.
        from flax import nnx
        tx_k = mo.multirate(
            optax.sgd(LEARNING_RATE / k, momentum=MOMENTUM),
            labels=mo.nnx.fast_by_filter(nnx.PathContains("head")), period=k)
      runners[flavour, auto, k] = flavour_runners[flavour](
          module, loss_fn, copy(params), tx_k, auto, batch, k * cycles,
          repeats)
  times = measure(runners)
  faults = {name: statistics.median(r.faults) for name, r in runners.items()}
  t_full, t_fast = times.pop("full"), times.pop("fast")
  all_active_over_plain = times.pop("all active") / t_full
  print(f"{name}: multirate's all-active phase / plain optax step "
        f"{all_active_over_plain:.3f}", flush=True)
  flavour_times = {key: times.pop(key) for key in list(times)
                   if len(key) == 3}
  rows = []
  for (dispatch, k), t_step in times.items():
    ideal = t_full / ((t_full + (k - 1) * t_fast) / k)
    speedup = t_full / t_step
    phase_peaks, switch_peak = memory.get((dispatch, k), (None, None))
    peak = switch_peak if dispatch == "cond" else (
        max(phase_peaks) if phase_peaks else None)
    rows.append(dict(model=name, dispatch=dispatch, k=k,
                     t_full_ms=1e3 * t_full, t_fast_ms=1e3 * t_fast,
                     t_step_ms=1e3 * t_step, speedup=speedup, ideal=ideal,
                     efficiency=speedup / ideal, clock=CLOCK,
                     peak_mib=peak and peak / MIB,
                     phase_peaks_mib=phase_peaks and [
                         b / MIB for b in phase_peaks],
                     full_peak_mib=memory["full"] / MIB,
                     peak_vs_full_phase=peak and phase_peaks and (
                         peak / phase_peaks[0]),
                     all_active_over_plain=all_active_over_plain,
                     page_faults_per_step=faults[dispatch, k],
                     full_page_faults_per_step=faults["full"]))
    print_row(rows[-1])
  steps = []
  for (flavour, dispatch, k), t_step in flavour_times.items():
    steps.append(dict(model=name, step=flavour, dispatch=dispatch, k=k,
                      t_step_ms=1e3 * t_step,
                      t_core_ms=1e3 * times[dispatch, k],
                      vs_core=t_step / times[dispatch, k]))
  return rows, steps


# Three rates on the transformer: the head every step, the top two encoder
# layers every 2 steps, the rest (embeddings, lower layers) every 6.
GROUP_PERIODS = {"head": 1, "top": 2, "rest": 6}
GROUP_PATTERNS = {"head": "^head/", "top": "^encoder_(2|3)/"}


_add_held = jax.jit(
    lambda params, held: {**params, **{m: jax.tree.map(jnp.add, params[m],
                                                       held[m])
                                       for m in held}}, donate_argnums=0)


def _with_drift(step, state, batch):
  """``step`` (plain optax) and then ``params += held`` of the modules that
  ``held`` names, in place: a plain phase step with the drift's update."""
  params, opt_state, held = state
  params, opt_state, loss = step(params, opt_state, batch)
  return (_add_held(params, held), opt_state, held), loss


def bench_groups(name: str, batch_size: int, repeats: int, cycles: int,
                 dispatches: tuple[str, ...]) -> list[dict]:
  """Three-rate multirate (:func:`mo.multirate_groups`) against its ideal.

  The ideal time per step is ``sum_phases share * t_phase``, ``share`` the
  fraction of a cycle's steps in the phase and ``t_phase`` the time of a
  plain optax step that differentiates and updates the phase's active
  modules only (as ``t_fast`` is for two rates); ``ideal_drift_ms`` adds to
  each phase's plain step the drift's update of the inactive groups'
  parameters (``x += held``, in place, a second program); another uses the
  library's own program of each phase (with drift), run alone, so that its
  ratio is what switching between programs costs. Rows with and without
  drift: drift adds the held updates of the inactive groups to every step,
  work that the plain ideal does not do.
  """
  module, params, batch = make_problem(name, batch_size)
  loss_fn = make_loss(module)
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  labels = mo.groups_by_path(GROUP_PATTERNS, default="rest")
  multi = mo.multirate_groups(tx, labels=labels, periods=GROUP_PERIODS)
  timetable = mo.find_timetable_state(multi.init(params)).timetable
  cycle = timetable.cycle
  shares = [sum(timetable.phase(t) == p for t in range(cycle)) / cycle
            for p in range(len(timetable.phases))]
  per_leaf = mo.find_timetable_state(multi.init(params)).labels
  modules_of_group: dict[str, set[str]] = {}
  for (path, _), group in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], per_leaf):
    modules_of_group.setdefault(group, set()).add(mo.path_str(path[:1]))
  runners: dict[Any, Runner] = {}
  for p, active in enumerate(timetable.phases):
    modules = tuple(sorted(set().union(*(modules_of_group[g] for g in active))))
    runners["plain", p] = core_runner(
        subset_step(loss_fn, tx, modules), copy(params),
        tx.init({m: params[m] for m in modules}), batch, cycle * cycles,
        repeats)
    # The same step followed by the drift's elementwise update of the
    # parameters of the inactive groups (x += held, in place: a second
    # program donating them), the least work drift must add to the phase.
    drifting = tuple(m for m in params if m not in modules)
    runners["plain+drift", p] = Runner(
        functools.partial(_with_drift, subset_step(loss_fn, tx, modules)),
        (copy(params), tx.init({m: params[m] for m in modules}),
         {m: jax.tree.map(lambda x: jnp.full_like(x, 1e-6), params[m])
          for m in drifting}),
        batch, cycle * cycles, repeats)
  host = mo.train_step(loss_fn, multi, dispatch="host", donate=True)
  for p in range(len(timetable.phases)):
    # The very jitted program 'host' dispatch runs for phase p (called as
    # the dispatch calls it, through jit's fast path; a Compiled object's
    # own __call__ costs more per call), on every step.
    program = functools.partial(host._dispatch._phase_program, p)
    runners["program", p] = core_runner(program, copy(params),
                                        multi.init(params), batch,
                                        cycle * cycles, repeats)
  for dispatch in dispatches:
    for drift in (True, False):
      tx_drift = mo.multirate_groups(tx, labels=labels, periods=GROUP_PERIODS,
                                     drift=drift)
      runners[dispatch, drift] = core_runner(
          mo.train_step(loss_fn, tx_drift, dispatch=dispatch, donate=True),
          copy(params), tx_drift.init(params), batch, cycle * cycles, repeats)
  times = measure(runners)
  phases = [dict(groups=sorted(active), share=shares[p],
                 t_plain_ms=1e3 * times["plain", p],
                 t_plain_drift_ms=1e3 * times["plain+drift", p],
                 t_program_ms=1e3 * times["program", p])
            for p, active in enumerate(timetable.phases)]
  ideal = sum(ph["share"] * ph["t_plain_ms"] for ph in phases)
  ideal_drift = sum(ph["share"] * ph["t_plain_drift_ms"] for ph in phases)
  ideal_programs = sum(ph["share"] * ph["t_program_ms"] for ph in phases)
  rows = []
  for dispatch, drift in [(d, drift) for d in dispatches
                          for drift in (True, False)]:
    t_step = 1e3 * times[dispatch, drift]
    rows.append(dict(model=name, dispatch=dispatch, drift=drift,
                     periods=GROUP_PERIODS,
                     groups={g: sorted(m) for g, m in modules_of_group.items()},
                     phases=phases, t_step_ms=t_step, ideal_ms=ideal,
                     efficiency=ideal / t_step,
                     ideal_drift_ms=ideal_drift,
                     efficiency_vs_plain_drift=ideal_drift / t_step,
                     ideal_programs_ms=ideal_programs,
                     efficiency_vs_programs=ideal_programs / t_step,
                     t_full_ms=phases[0]["t_plain_ms"],
                     speedup=phases[0]["t_plain_ms"] / t_step, clock=CLOCK,
                     page_faults_per_step=statistics.median(
                         runners[dispatch, drift].faults)))
    print_groups(rows[-1])
  return rows


GROUPS_HEADER = (f"{'model':<12} {'dispatch':<8} {'phase':<22} {'share':>6} "
                 f"{'plain ms':>9} {'program ms':>10}")


def print_groups(r: dict) -> None:
  for ph in r["phases"] if r["drift"] else ():
    print(f"{r['model']:<12} {r['dispatch']:<8} {'+'.join(ph['groups']):<22} "
          f"{ph['share']:>6.3f} {ph['t_plain_ms']:>9.2f} "
          f"{ph['t_program_ms']:>10.2f}")
  print(f"{r['model']:<12} {r['dispatch']:<8} three rates {GROUP_PERIODS}, "
        f"drift {r['drift']}: t_step {r['t_step_ms']:.2f} ms, ideal {r['ideal_ms']:.2f} ms, "
        f"efficiency {r['efficiency']:.3f} (vs plain + drift update "
        f"{r['efficiency_vs_plain_drift']:.3f}, vs its own phase programs "
        f"{r['efficiency_vs_programs']:.3f}), speedup over full "
        f"{r['speedup']:.2f}", flush=True)


def bench_bounds(name: str, batch_size: int, repeats: int,
                 dispatches: tuple[str, ...]) -> list[dict]:
  """Each program's time against its lower bound, from the profiler."""
  module, params, batch = make_problem(name, batch_size)
  profile = mo.profile_splits(
      make_loss(module), params, batch, {"head": "^head/"},
      optimizer=optax.sgd(LEARNING_RATE, momentum=MOMENTUM), repeats=repeats,
      dispatches=dispatches, timer=CLOCKS[CLOCK], verbose=False)
  full, fast = profile.full, profile.splits[0].fast
  rows = [("full", "host", full.seconds, full),
          ("fast", "host", fast.seconds, fast)]
  if "cond" in dispatches:
    rows += [("full", "cond", profile.splits[0].cond_slow_seconds, full),
             ("fast", "cond", profile.splits[0].cond_fast_seconds, fast)]
  out = []
  for phase, dispatch, seconds, parts in rows:
    out.append(dict(model=name, phase=phase, dispatch=dispatch,
                    t_ms=1e3 * seconds, grad_ms=1e3 * parts.grad_seconds,
                    update_ms=1e3 * parts.update_seconds,
                    bound_ms=1e3 * parts.bound_seconds,
                    forward_ms=1e3 * profile.forward_seconds,
                    overhead=seconds / parts.bound_seconds - 1))
    print_bound(out[-1])
  return out


BOUNDS_HEADER = (f"{'model':<12} {'phase':<5} {'dispatch':<8} {'t ms':>9} "
                 f"{'grad ms':>9} {'update ms':>9} {'bound ms':>9} "
                 f"{'overhead':>8} {'fwd ms':>8}")


def print_bound(r: dict) -> None:
  print(f"{r['model']:<12} {r['phase']:<5} {r['dispatch']:<8} {r['t_ms']:>9.2f} "
        f"{r['grad_ms']:>9.2f} {r['update_ms']:>9.2f} {r['bound_ms']:>9.2f} "
        f"{r['overhead']:>+8.1%} {r['forward_ms']:>8.2f}", flush=True)


HEADER = (f"{'model':<12} {'dispatch':<8} {'k':>3} {'t_full ms':>10} "
          f"{'t_fast ms':>10} {'t_step ms':>10} {'speedup':>8} {'ideal':>6} "
          f"{'eff.':>6} {'faults':>7} {'peak MiB':>9} {'/phase 0':>8}")


def print_row(r: dict) -> None:
  memory = (f"{r['peak_mib']:>9.1f} {r['peak_vs_full_phase']:>8.3f}"
            if r["peak_mib"] else "")
  print(f"{r['model']:<12} {r['dispatch']:<8} {r['k']:>3} {r['t_full_ms']:>10.1f} "
        f"{r['t_fast_ms']:>10.1f} {r['t_step_ms']:>10.1f} {r['speedup']:>8.2f} "
        f"{r['ideal']:>6.2f} {r['efficiency']:>6.3f} "
        f"{r['page_faults_per_step']:>7.0f} {memory}", flush=True)


STEPS_HEADER = (f"{'model':<12} {'step':<6} {'dispatch':<8} {'k':>3} "
                f"{'t_step ms':>10} {'core ms':>10} {'vs core':>8}")


def print_step(r: dict) -> None:
  print(f"{r['model']:<12} {r['step']:<6} {r['dispatch']:<8} {r['k']:>3} "
        f"{r['t_step_ms']:>10.2f} {r['t_core_ms']:>10.2f} "
        f"{r['vs_core']:>8.3f}", flush=True)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer repeats and cycles (whole run < 3 minutes)")
  parser.add_argument("--json", type=Path, help="write the rows to this file")
  parser.add_argument("--models", nargs="+", default=["resnet", "transformer"])
  parser.add_argument("--dispatch", nargs="+", default=["cond", "host"],
                      choices=["cond", "host"])
  parser.add_argument("--periods", nargs="+", type=int, default=list(PERIODS))
  parser.add_argument("--cond-periods", nargs="+", type=int,
                      help="periods measured with 'cond' dispatch (default: "
                      "--periods; with --quick on CPU only 5)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--steps", nargs="*", default=["linen", "nnx"],
                      choices=["linen", "nnx"],
                      help="train steps measured beside the core one, with "
                      "'auto' dispatch, on the same model")
  parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                      help="time per step in wall-clock time, or in CPU time "
                      "of this process (steadier on a shared CPU)")
  parser.add_argument("--bounds", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="each program's time against its lower bound")
  parser.add_argument("--bounds-only", action="store_true",
                      help="only the lower bounds (no multirate rows)")
  parser.add_argument("--groups", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="three-rate multirate (multirate_groups) against "
                      "its ideal, on the transformer")
  parser.add_argument("--repeats", type=int,
                      help="timed blocks per variant (default 7, --quick 3)")
  parser.add_argument("--groups-only", action="store_true",
                      help="only the three-rate rows")
  args = parser.parse_args(argv)
  global CLOCK
  CLOCK = args.clock
  repeats, cycles = (3, 1) if args.quick else (7, 2)
  repeats = args.repeats or repeats
  # On CPU a conv net's slow step inside lax.cond takes seconds
  # (jax-ml/jax#12868): measure 'cond' with fewer repeats there.
  on_cpu = jax.default_backend() == "cpu"
  cond_periods = args.cond_periods or (
      [5] if args.quick and on_cpu else args.periods)
  cond_repeats = (1 if args.quick else 3) if on_cpu else repeats

  auto = mo.resolve_dispatch("auto")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}, 'auto' dispatch = {auto!r}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"allocator: LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} "
        f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r}")
  groups = []
  if (args.groups or args.groups_only) and "transformer" in args.models:
    print(GROUPS_HEADER)
    groups = bench_groups("transformer", args.batch_size, repeats, cycles,
                          tuple(args.dispatch))
  if args.groups_only:
    write_json(dict(backend=jax.default_backend(), jax_version=jax.__version__,
                    quick=args.quick, clock=args.clock, groups=groups),
               args.json)
    return []
  bounds = []
  if args.bounds or args.bounds_only:
    print(BOUNDS_HEADER)
    for name in args.models:
      bounds += bench_bounds(name, args.batch_size,
                             7 if args.quick else 15, tuple(args.dispatch))
  rows, steps = [], []
  if not args.bounds_only:
    print(HEADER)
  for name in args.models if not args.bounds_only else ():
    model_rows, model_steps = bench_model(
        name, args.batch_size, repeats, cycles, tuple(args.dispatch),
        tuple(args.periods), tuple(cond_periods), cond_repeats,
        tuple(args.steps))
    rows += model_rows
    steps += model_steps
  for r in rows:
    r["auto"] = r["dispatch"] == auto
  if steps:
    print(STEPS_HEADER)
    for s in steps:
      print_step(s)
  write_json(dict(backend=jax.default_backend(), auto_dispatch=auto,
                  jax_version=jax.__version__, quick=args.quick,
                  clock=args.clock, rows=rows,
                  xla_flags=os.environ.get("XLA_FLAGS", ""),
                  ld_preload=os.environ.get("LD_PRELOAD", ""),
                  malloc_conf=os.environ.get("MALLOC_CONF", ""),
                  steps=steps, bounds=bounds, groups=groups),
             args.json)
  return rows


if __name__ == "__main__":
  main()
