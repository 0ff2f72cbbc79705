"""What each choice of fast set would save, measured on the current backend.

For each candidate fast set this compiles the programs the library's own
train step runs (:class:`~multirate_optax.core.PhaseDispatch` over
:meth:`TrainStep.apply_phase`): the full phase, the fast phase and, for
``'cond'`` dispatch, the one ``lax.switch`` program; it times them and reads
their peak memory and flops from XLA. Beside them it compiles the parts a step
cannot do without, each on its own: the forward pass, the forward pass with
the backward pass of the active leaves (no update), and the update of the
active leaves from given gradients. Their sum is a lower bound on a step's
time; a step far above it does work it need not (a copy, a recomputation).

The user's arrays are only read: no program donates its arguments, and every
state a program returns is a new one.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from multirate_optax.core._dispatch import PhaseDispatch
from multirate_optax.core._gradients import value_and_active_grad
from multirate_optax.core._groups import fast_by_depth, fast_by_path, FAST, SLOW
from multirate_optax.core._timetable import find_timetable_state
from multirate_optax.core._train_step import TrainStep
from multirate_optax.timetables._multirate import multirate

PyTree = Any
Candidate = Union[str, Callable[[PyTree], PyTree], PyTree]

#: The multirate timetable profiled: phase 0 trains every leaf, phase 1 the
#: fast ones; the programs of a phase do not depend on the period.
_FULL, _FAST = 0, 1


def predicted_speedup(t_full: float, t_fast: float, period: int,
                      t_slow: Optional[float] = None) -> float:
  """The speed-up of multirate steps over full steps, from phase times.

  A cycle of ``period`` steps runs one slow step and ``period - 1`` fast ones
  where training every leaf would run ``period`` full steps.

  Args:
    t_full: seconds of a full step (every leaf trained), the reference.
    t_fast: seconds of a fast step.
    period: the multirate period k.
    t_slow: seconds of the slow step; ``t_full`` by default (``'host'``
      dispatch runs the full program itself), the ``lax.switch`` program's
      slow branch for ``'cond'``.

  Returns:
    ``k t_full / (t_slow + (k - 1) t_fast)``.

  Example:
    >>> import multirate_optax as mo
    >>> mo.predicted_speedup(t_full=1.0, t_fast=0.25, period=5)
    2.5
  """
  t_slow = t_full if t_slow is None else t_slow
  return period * t_full / (t_slow + (period - 1) * t_fast)


@dataclasses.dataclass(frozen=True)
class PhaseProfile:
  """One phase's program: its time, its lower bound and its resources.

  Attributes:
    seconds: median time of the phase program (``'host'`` dispatch).
    grad_seconds: median time of the forward pass with the backward pass of
      the phase's active leaves, compiled alone (no update).
    update_seconds: median time of the optimizer update of the phase (from
      given gradients) and of applying it, compiled alone.
    peak_bytes: the phase program's peak memory from XLA's analysis of the
      compiled program (arguments + outputs - aliased + temporaries).
    flops: the phase program's flops from XLA's cost analysis.

  Example:
    A full step of 12 ms whose backward pass and update, compiled alone,
    take 8 and 2 ms is 20% above its bound:

    >>> from multirate_optax.profiling import PhaseProfile
    >>> full = PhaseProfile(seconds=0.012, grad_seconds=0.008,
    ...                     update_seconds=0.002, peak_bytes=2**20, flops=1e6)
    >>> full.bound_seconds, round(full.overhead, 3)
    (0.01, 0.2)
  """

  seconds: float
  grad_seconds: float
  update_seconds: float
  peak_bytes: int
  flops: float

  @property
  def bound_seconds(self) -> float:
    """The lower bound: ``grad_seconds + update_seconds``."""
    return self.grad_seconds + self.update_seconds

  @property
  def overhead(self) -> float:
    """How far the program is above its bound: ``seconds / bound - 1``."""
    return self.seconds / self.bound_seconds - 1.0


@dataclasses.dataclass(frozen=True)
class SplitProfile:
  """One candidate fast set: its share, its fast phase, predicted speed-ups.

  Attributes:
    name: the candidate as given (a regex, ``'depth n'``, or its key).
    fast_share: the fraction of the parameters (elements) that are fast.
    fast: the fast phase's :class:`PhaseProfile`.
    cond_slow_seconds, cond_fast_seconds: median times of the ``lax.switch``
      program (``'cond'`` dispatch) on a slow and on a fast step; ``None``
      if ``'cond'`` was not profiled.
    speedup_host, speedup_cond: the predicted speed-up over full steps for
      each period, by :func:`predicted_speedup` (``{}`` if not profiled).

  Example:
    The last of three layers as the fast set, profiled with ``'host'``
    dispatch only:

    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> params = {f'dense_{i}': jax.random.normal(key, (16, 16)) / 4
    ...           for i, key in enumerate(keys)}
    >>> def loss_fn(params, x):
    ...   for w in params.values():
    ...     x = jnp.tanh(x @ w)
    ...   return jnp.mean(x ** 2)
    >>> profile = mo.profile_splits(loss_fn, params, jnp.ones((8, 16)), ['^dense_2'],
    ...                             periods=(5,), repeats=1, dispatches=('host',),
    ...                             verbose=False)
    >>> split = profile.splits[0]
    >>> split.name, round(split.fast_share, 3), split.speedup_cond
    ('^dense_2', 0.333, {})
    >>> split.speedup_host[5] == mo.predicted_speedup(
    ...     profile.full.seconds, split.fast.seconds, 5)
    True
  """

  name: str
  fast_share: float
  fast: PhaseProfile
  cond_slow_seconds: Optional[float]
  cond_fast_seconds: Optional[float]
  speedup_host: Mapping[int, float]
  speedup_cond: Mapping[int, float]


@dataclasses.dataclass(frozen=True)
class SplitsProfile:
  """What :func:`profile_splits` measured: the full step and every split.

  Attributes:
    backend: the JAX backend the programs ran on.
    periods: the periods k of the predicted speed-ups.
    repeats: the timed calls of each program (medians are reported).
    clock: the name of the timer that measured them (``'perf_counter'``,
      wall-clock time, by default; ``'process_time'``, this process's CPU
      time, moves less with other jobs' load on a shared machine).
    forward_seconds: median time of the forward pass alone (the loss).
    full: the full phase's :class:`PhaseProfile`.
    splits: one :class:`SplitProfile` per candidate.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> params = {f'dense_{i}': jax.random.normal(key, (16, 16)) / 4
    ...           for i, key in enumerate(keys)}
    >>> def loss_fn(params, x):
    ...   for w in params.values():
    ...     x = jnp.tanh(x @ w)
    ...   return jnp.mean(x ** 2)
    >>> profile = mo.profile_splits(loss_fn, params, jnp.ones((8, 16)), ['^dense_2'],
    ...                             periods=(5,), repeats=1, dispatches=('host',),
    ...                             verbose=False)
    >>> profile.periods, profile.repeats, [s.name for s in profile.splits]
    ((5,), 1, ['^dense_2'])
    >>> profile.splits[0].fast.flops < profile.full.flops  # no backward below dense_2
    True
    >>> import json
    >>> saved = json.loads(profile.to_json())
    >>> list(saved), saved['splits'][0]['name']
    (['backend', 'periods', 'repeats', 'clock', 'forward_seconds', 'full', 'splits'], '^dense_2')
  """

  backend: str
  periods: tuple[int, ...]
  repeats: int
  forward_seconds: float
  full: PhaseProfile
  splits: tuple[SplitProfile, ...]
  clock: str = "perf_counter"

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (times in seconds, memory in bytes)."""

    def phase(p: PhaseProfile) -> dict[str, Any]:
      return {**dataclasses.asdict(p), "bound_seconds": p.bound_seconds,
              "overhead": p.overhead}

    return {
        "backend": self.backend, "periods": list(self.periods),
        "repeats": self.repeats, "clock": self.clock,
        "forward_seconds": self.forward_seconds,
        "full": phase(self.full),
        "splits": [{
            "name": s.name, "fast_share": s.fast_share, "fast": phase(s.fast),
            "cond_slow_seconds": s.cond_slow_seconds,
            "cond_fast_seconds": s.cond_fast_seconds,
            "speedup_host": {str(k): v for k, v in s.speedup_host.items()},
            "speedup_cond": {str(k): v for k, v in s.speedup_cond.items()},
        } for s in self.splits]}

  def to_json(self, **kwargs: Any) -> str:
    """:meth:`to_dict` as JSON text (``kwargs`` go to ``json.dumps``)."""
    return json.dumps(self.to_dict(), **kwargs)

  def __str__(self) -> str:
    ms, mib = 1e3, 2.0 ** -20
    full = self.full
    speedups = "".join(f" {'host k=' + str(k):>9}" for k in self.periods) + (
        "".join(f" {'cond k=' + str(k):>9}" for k in self.periods)
        if any(s.speedup_cond for s in self.splits) else "")
    lines = [
        f"backend {self.backend}, medians of {self.repeats} interleaved calls"
        f" ({self.clock});"
        f" forward alone {self.forward_seconds * ms:.2f} ms",
        f"full step {full.seconds * ms:.2f} ms (bound {full.bound_seconds * ms:.2f}"
        f" ms = grad {full.grad_seconds * ms:.2f} + update "
        f"{full.update_seconds * ms:.2f}, overhead {full.overhead:+.1%}), peak "
        f"{full.peak_bytes * mib:.1f} MiB",
        f"{'fast set':<24} {'share':>7} {'t_fast ms':>9} {'bound ms':>9} "
        f"{'over':>6} {'peak MiB':>8}" + speedups]
    for s in self.splits:
      cond = "".join(f" {s.speedup_cond[k]:>9.2f}" for k in self.periods
                     ) if s.speedup_cond else ""
      lines.append(
          f"{s.name[:24]:<24} {s.fast_share:>7.2%} {s.fast.seconds * ms:>9.2f} "
          f"{s.fast.bound_seconds * ms:>9.2f} {s.fast.overhead:>+6.0%} "
          f"{s.fast.peak_bytes * mib:>8.1f}"
          + "".join(f" {s.speedup_host[k]:>9.2f}" for k in self.periods)
          + cond)
    return "\n".join(lines)


def _peak_bytes(compiled: jax.stages.Compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _flops(compiled: jax.stages.Compiled) -> float:
  cost = compiled.cost_analysis()
  # Older JAX returns one dict per program in a list.
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _named_candidates(params: PyTree, candidates: Optional[
    Union[Sequence[Candidate], Mapping[str, Candidate]]]
) -> list[tuple[str, Callable[[PyTree], PyTree]]]:
  """The candidates as (name, labels function), checked on ``params``."""
  if candidates is None:
    if not isinstance(params, Mapping) or len(params) < 2:
      raise ValueError(
          "profile_splits' default candidates are fast_by_depth(n) for n = 1 "
          "to the number of top-level modules - 1, which needs parameters "
          "whose top level is a mapping of at least 2 modules; got "
          f"{type(params).__name__}: pass candidates (path regexes, labels "
          "functions or label trees).")
    named = [(f"depth {n}", fast_by_depth(n)) for n in range(1, len(params))]
  elif isinstance(candidates, Mapping):
    named = list(candidates.items())
  elif isinstance(candidates, (str, bytes)) or not isinstance(
      candidates, Sequence):
    raise TypeError(
        "candidates must be a sequence (or a mapping from names) of fast "
        f"sets, got {type(candidates).__name__}: wrap a single one in a list.")
  else:
    named = [(c if isinstance(c, str) else getattr(c, "__name__", repr(c))
              if callable(c) else f"candidate {i}", c)
             for i, c in enumerate(candidates)]
  if not named:
    raise ValueError("candidates is empty: give at least one fast set.")
  checked = []
  for name, candidate in named:
    if isinstance(candidate, str):
      labels = fast_by_path(candidate)
    elif callable(candidate):
      labels = candidate
    else:
      labels = (lambda tree: lambda params: tree)(candidate)
    tree = labels(params)
    try:
      leaves = jax.tree.leaves(jax.tree.map(lambda label, _: label, tree,
                                            params))
    except ValueError as e:
      raise ValueError(
          f"candidate {name!r}: its labels do not have the structure of the "
          f"parameters ({e}).") from None
    bad = sorted({repr(l) for l in leaves if l not in (FAST, SLOW)})
    if bad:
      raise ValueError(
          f"candidate {name!r} labels leaves {', '.join(bad)}; expected "
          f"{FAST!r} or {SLOW!r}.")
    if FAST not in leaves or SLOW not in leaves:
      which = "fast" if FAST not in leaves else "slow"
      raise ValueError(
          f"candidate {name!r} leaves no parameter {which}: a fast set must "
          "hold some parameters and leave some slow (every leaf fast is the "
          "full step itself).")
    checked.append((str(name), labels))
  return checked


def _fast_share(labels: Callable[[PyTree], PyTree], params: PyTree) -> float:
  sizes = [(label, jnp.size(leaf)) for label, leaf in zip(
      jax.tree.leaves(labels(params)), jax.tree.leaves(params))]
  return sum(s for l, s in sizes if l == FAST) / sum(s for _, s in sizes)


class _Programs:
  """The compiled programs of one optimizer, each with the arguments it takes."""

  def __init__(self, loss_fn, optimizer, params, opt_state, batch, has_aux):
    self._step = TrainStep(loss_fn, optimizer, has_aux=has_aux,
                           dispatch="host", donate=False)
    self._loss_fn, self._optimizer, self._has_aux = loss_fn, optimizer, has_aux
    self._params, self._opt_state, self._batch = params, opt_state, batch
    self._timetable_state = find_timetable_state(opt_state)

    def grad_only(phase, params, opt_state, batch):
      del opt_state
      active = self._timetable_state.active(phase)
      value, grads = value_and_active_grad(loss_fn, active, has_aux)(
          params, batch)
      # Only the active leaves' gradients: the zeros of the others are free.
      return value, [g for g, a in zip(jax.tree.leaves(grads), active) if a]

    def update_only(phase, params, opt_state, active_grads):
      active = self._timetable_state.active(phase)
      it = iter(active_grads)
      grads = jax.tree.unflatten(jax.tree.structure(params), [
          next(it) if a else jnp.zeros_like(leaf)
          for leaf, a in zip(jax.tree.leaves(params), active)])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._grad_only = PhaseDispatch(grad_only, state_argnum=1,
                                    dispatch="host", donate_argnums=())
    self._update_only = PhaseDispatch(update_only, state_argnum=1,
                                      dispatch="host", donate_argnums=())

  def phase(self, phase: int):
    """(step, grad-only, update-only) of ``phase``: thunks and compiled."""
    args = (self._params, self._opt_state, self._batch)
    step = self._step.program(*args, phase=phase).compile()
    grad = self._grad_only.program(*args, phase=phase).compile()
    active_grads = grad(*args)[1]
    update_args = (self._params, self._opt_state, active_grads)
    update = self._update_only.program(*update_args, phase=phase).compile()
    return ((lambda: step(*args)), (lambda: grad(*args)),
            (lambda: update(*update_args)), step)

  def switch(self):
    """The ``lax.switch`` program's thunks on a slow and on a fast step."""
    args = (self._params, self._opt_state, self._batch)
    switch = self._step.program(*args).compile()
    # The state after one step is at count 1: a fast step for period 2.
    fast_args = (self._params, switch(*args)[1], self._batch)
    return (lambda: switch(*args)), (lambda: switch(*fast_args))


def _median_times(thunks: Mapping[str, Callable[[], Any]], repeats: int,
                  verbose: bool, timer: Callable[[], float]
                  ) -> dict[str, float]:
  """Median seconds of each thunk: warm-up, then interleaved timed calls."""
  for thunk in thunks.values():
    jax.block_until_ready(thunk())
  times: dict[str, list[float]] = {name: [] for name in thunks}
  for repeat in range(repeats):
    for name, thunk in thunks.items():
      start = timer()
      jax.block_until_ready(thunk())
      times[name].append(timer() - start)
    if verbose:
      print(f"\rprofile_splits: timed {repeat + 1}/{repeats}", end="",
            file=sys.stderr, flush=True)
  if verbose:
    print(file=sys.stderr)
  return {name: statistics.median(t) for name, t in times.items()}


def profile_splits(
    loss_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    batch: Any,
    candidates: Optional[Union[Sequence[Candidate],
                               Mapping[str, Candidate]]] = None,
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    has_aux: bool = False,
    periods: Sequence[int] = (2, 5, 10),
    dispatches: Sequence[str] = ("host", "cond"),
    repeats: int = 10,
    timer: Callable[[], float] = time.perf_counter,
    verbose: bool = True,
) -> SplitsProfile:
  """Measures, for each candidate fast set, what multirate training would save.

  For each candidate, builds ``multirate(optimizer, labels=..., period=2)``
  and its :func:`~multirate_optax.train_step`, compiles the full and the fast
  phase programs (and, for ``'cond'``, the ``lax.switch`` program) on the
  current backend, and times them: one warm-up call each, then ``repeats``
  calls of every program interleaved, medians reported. The parts of each
  phase are compiled and timed alone too (see :class:`PhaseProfile`). It
  costs about four compilations per candidate and ``repeats`` calls of each.
  Nothing is donated: ``params`` and ``batch`` stay as they are.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), as for the train step.
    params: the parameters (their values are used; they are not changed).
    batch: one batch, of the size you will train with.
    candidates: fast sets to compare: path regexes (``'^head/'``), labels
      functions (``mo.fast_by_depth(2)``), trees of ``'fast'``/``'slow'``
      labels, in a sequence or a mapping from names. By default
      ``fast_by_depth(n)`` for n = 1 to the number of top-level modules - 1.
    optimizer: what both groups train with; ``optax.sgd(1e-3, momentum=0.9)``
      by default (an adaptive optimizer's update costs a little more).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    periods: the periods k of the predicted speed-ups.
    dispatches: ``'host'`` and/or ``'cond'``; the fast phase's bound and the
      host speed-ups are always reported, the switch program only with
      ``'cond'`` (on CPU it is slow for conv nets, jax-ml/jax#12868).
    repeats: timed calls of each program.
    timer: the clock, in seconds: wall-clock ``time.perf_counter`` by
      default; ``time.process_time`` (this process's CPU time, all its
      threads) moves less with other jobs' load on a shared machine.
    verbose: print progress to stderr.

  Returns:
    A :class:`SplitsProfile` (``print`` it for a table; ``to_json()``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> params = {f'dense_{i}': jax.random.normal(key, (32, 32)) / 6
    ...           for i, key in enumerate(keys)}
    >>> def loss_fn(params, x):
    ...   for w in params.values():
    ...     x = jnp.tanh(x @ w)
    ...   return jnp.mean(x ** 2)
    >>> profile = mo.profile_splits(loss_fn, params, jnp.ones((16, 32)),
    ...                             repeats=2, dispatches=('host',),
    ...                             verbose=False)
    >>> [(s.name, round(s.fast_share, 3)) for s in profile.splits]
    [('depth 1', 0.333), ('depth 2', 0.667)]
    >>> profile.splits[0].fast.flops < profile.splits[1].fast.flops
    True
  """
  dispatches = tuple(dispatches)
  unknown = [d for d in dispatches if d not in ("host", "cond")]
  if unknown or not dispatches:
    raise ValueError(
        f"dispatches must name 'host' and/or 'cond', got {dispatches!r}.")
  periods = tuple(int(k) for k in periods)
  if any(k < 2 for k in periods):
    raise ValueError(f"periods must be at least 2, got {periods!r}.")
  if int(repeats) < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats!r}.")
  named = _named_candidates(params, candidates)
  optimizer = optax.sgd(1e-3, momentum=0.9) if optimizer is None else optimizer

  def log(message: str) -> None:
    if verbose:
      print(f"profile_splits: {message}", file=sys.stderr, flush=True)

  forward = jax.jit(loss_fn).lower(params, batch).compile()
  thunks: dict[str, Callable[[], Any]] = {"forward": lambda: forward(
      params, batch)}
  compiled: dict[str, jax.stages.Compiled] = {}
  shares = {}
  for i, (name, labels) in enumerate(named):
    log(f"compiling {name!r} ({i + 1}/{len(named)})")
    tx = multirate(optimizer, labels=labels, period=2)
    programs = _Programs(loss_fn, tx, params, tx.init(params), batch, has_aux)
    phases = (_FULL, _FAST) if i == 0 else (_FAST,)
    for phase in phases:
      step, grad, update, compiled[(name, phase)] = programs.phase(phase)
      thunks.update({(name, phase, "step"): step, (name, phase, "grad"): grad,
                     (name, phase, "update"): update})
    if "cond" in dispatches:
      thunks[(name, "cond", _FULL)], thunks[(name, "cond", _FAST)] = (
          programs.switch())
    shares[name] = _fast_share(labels, params)
  log(f"timing {len(thunks)} programs")
  seconds = _median_times(thunks, int(repeats), verbose, timer)

  def phase_profile(name: str, phase: int) -> PhaseProfile:
    return PhaseProfile(
        seconds=seconds[(name, phase, "step")],
        grad_seconds=seconds[(name, phase, "grad")],
        update_seconds=seconds[(name, phase, "update")],
        peak_bytes=_peak_bytes(compiled[(name, phase)]),
        flops=_flops(compiled[(name, phase)]))

  full = phase_profile(named[0][0], _FULL)
  splits = []
  for name, _ in named:
    fast = phase_profile(name, _FAST)
    cond = "cond" in dispatches
    cond_slow = seconds[(name, "cond", _FULL)] if cond else None
    cond_fast = seconds[(name, "cond", _FAST)] if cond else None
    splits.append(SplitProfile(
        name=name, fast_share=shares[name], fast=fast,
        cond_slow_seconds=cond_slow, cond_fast_seconds=cond_fast,
        speedup_host={k: predicted_speedup(full.seconds, fast.seconds, k)
                      for k in periods} if "host" in dispatches else {},
        speedup_cond={k: predicted_speedup(full.seconds, cond_fast, k,
                                           t_slow=cond_slow)
                      for k in periods} if cond else {}))
  return SplitsProfile(backend=jax.default_backend(), periods=periods,
                       repeats=int(repeats), forward_seconds=seconds["forward"],
                       full=full, splits=tuple(splits),
                       clock=getattr(timer, "__name__", repr(timer)))
