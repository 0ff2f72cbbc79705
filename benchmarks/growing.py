"""Growing a CNN in width against training it at full width, per ingredient.

A ResNet-style CNN (experiments.models.growing.GrowingResNet: stem, residual
blocks with BatchNorm after every convolution, classifier) is trained from
scratch on scikit-learn's digits, up-sampled to 16x16, with SGD (Nesterov
momentum 0.9, weight decay 5e-4, rate 0.1 annealed by one cosine over the
whole run, indexed by the global step in every method). Every method sees the
same minibatches for a seed; the growing ones start from the same stage-0
weights. The methods form a cumulative ablation (Yuan, Savarese & Maire,
NeurIPS 2023):

  full_width    the final widths for every step (the baseline);
  pairing       grows per multirate_optax.growth_plan by neuron pairing
                (function-preserving), without variance transfer; the
                optimizer state is made afresh at each growth (momentum
                zero), its count set to the global step so that the cosine
                does not restart;
  +variance     as pairing, with variance transfer (old weights of BN-
                normalised layers whose fan-in grows rescaled, the BN running
                statistics compensated);
  +lr_layer     as +variance, with every update element scaled by
                ||W_dt|| / ||W_0|| of its stage, norms within each parameter
                (multirate_optax.scale_by_stage_norms, scope 'layer');
  +lr_network   the same with norms over the whole network (the scope's
                ablation);
  +state        the full method: +lr_layer (the scope of --state-scope) with
                the optimizer state carried across growths
                (multirate_optax.grow_optimizer_state) instead of reset; the
                scope is 'layer' because the full run could not tell the two
                apart (benchmarks/results/growing_full.json), and per-layer
                norms do not let one large layer set every layer's rates;
  +state p_c=…  the full method on the plan with the paper's width rate
                (--compare-width-rate), where the main plan doubles.

The plan: every width starts at a quarter of its final size; the main plan
doubles them (8 -> 16 -> 32, --width-rate 1) rather than adding the paper's
20% per stage, because XLA:CPU runs convolutions whose channel counts are not
multiples of 8 far slower than their FLOPs say (width 29 slower than 32 here:
see each run's per-stage step times in the JSON), so the paper's widths (8,
10, 12, 14, 17, 20, 24, 29, 32) can hardly save wall-clock on this CPU; the
last row measures that. The first stage is the longest that leaves the last
(full-width) stage at least 1 - --grow-fraction of the steps.

Reported per method, over seeds: test accuracy and test loss (mean and
standard deviation; the loss resolves differences finer than one test image),
training wall-clock (median) and its ratio to full_width's, training FLOPs
(XLA's cost analysis of each stage's compiled step times that stage's steps,
summed; over full_width's one program times every step), and the time spent
compiling the step programs. The clock runs over the train steps and the
growths themselves (mo.grow, the new optimizer state), not over compilation
(each stage's program is compiled and run once, and each growth's eager ops
run once, before the clock resumes) nor over evaluation. The methods of a
seed take turns an epoch at a time, so that changes of load on a shared
machine fall on all of them. Test accuracy is also taken every --eval-every
epochs and at the end of every stage, which gives the PNG of accuracy
against training time (mean over seeds). At every growth, the eval-mode
logits on the test images before and after are compared: growth keeps the
function, so the largest difference should be float rounding.

Run from the repository root::

  python -m benchmarks.growing --quick

which writes results/growing/growing.{json,png} (``--json``, ``--plot`` to
choose). XLA:CPU's convolution speed depends on XLA_FLAGS (none set here;
recorded in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json
from experiments.data import load_digits_splits, shuffled_batches
from experiments.models.growing import GrowingResNet, resnet_layers

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
FULL_METHOD = "+state"


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the ablation.

  Attributes:
    name: its name in the table.
    grows: False for the full-width baseline.
    variance_transfer: passed to mo.grow.
    scope: the scope of mo.scale_by_stage_norms, or None for no rate
      adaptation.
    carry_state: carry the optimizer state across growths
      (mo.grow_optimizer_state) rather than start it afresh.
    width_rate: the plan's width rate, where it is not the main plan's.
  """

  name: str
  grows: bool = True
  variance_transfer: bool = False
  scope: Optional[str] = None
  carry_state: bool = False
  width_rate: Optional[float] = None

  @property
  def program(self) -> str:
    """Methods with the same key run the same compiled programs."""
    if not self.grows:
      return "full"
    return f"grow/{self.scope}/{self.width_rate}"


def methods(state_scope: str,
            compare_width_rate: Optional[float]) -> tuple[Method, ...]:
  full = Method(FULL_METHOD, variance_transfer=True, scope=state_scope,
                carry_state=True)
  table = (
      Method("full_width", grows=False),
      Method("pairing"),
      Method("+variance", variance_transfer=True),
      Method("+lr_layer", variance_transfer=True, scope="layer"),
      Method("+lr_network", variance_transfer=True, scope="network"),
      full,
  )
  if compare_width_rate:
    table += (dataclasses.replace(
        full, name=f"{FULL_METHOD} p_c={compare_width_rate:g}",
        width_rate=compare_width_rate),)
  return table


def base_optimizer(total_steps: int) -> optax.GradientTransformation:
  """freezeout.py's SGD, its rate annealed over the whole run.

  The schedule reads the optimizer's count, so a state made afresh at a
  growth must have its count set to the global step (:func:`fresh_state`).
  """
  return optax.chain(
      optax.add_decayed_weights(WEIGHT_DECAY),
      optax.sgd(optax.cosine_decay_schedule(LEARNING_RATE, total_steps),
                momentum=MOMENTUM, nesterov=True))


def optimizer(method: Method, total_steps: int,
              stages: Any) -> optax.GradientTransformation:
  """The method's optimizer for the network of one stage."""
  tx = base_optimizer(total_steps)
  if method.scope is None:
    return tx
  return optax.chain(tx, mo.scale_by_stage_norms(stages, method.scope))


def schedule_counts(opt_state) -> set[int]:
  """The optimizer counts in a state (one value when they agree)."""
  return {int(count) for _, count in
          optax.tree_utils.tree_get_all_with_path(opt_state, "count")}


def network(widths: dict[str, int], blocks: int) -> GrowingResNet:
  return GrowingResNet(widths["stream"],
                       tuple(widths[f"block{i}"] for i in range(blocks)))


def make_step(model: GrowingResNet, tx: optax.GradientTransformation):
  """A jitted train step; params, batch statistics and state are donated."""

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      logits, updated = model.apply(
          {"params": p, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updated["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def copy(tree):
  return jax.tree.map(jnp.array, tree)


class Clock:
  """Wall-clock accumulated over the ``with`` blocks only."""

  def __init__(self):
    self.seconds = 0.0

  def __enter__(self):
    self._start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds += time.perf_counter() - self._start


class Programs:
  """Compiled step programs by (program key, stage), with their compile time.

  Methods whose steps are the same computation (pairing and +variance;
  +lr_layer and +state) share programs; the growth records, hence the
  element stages, are the same for every seed, so a stage's program serves
  every seed. Each method is charged the compile time of the programs it
  runs, as if it had compiled them itself. The seconds include one run of
  each program, outside the clock.
  """

  def __init__(self):
    self.compiled: dict[tuple[str, int], Any] = {}
    self.seconds: dict[tuple[str, int], float] = {}
    self.flops: dict[tuple[str, int], float] = {}

  def get(self, key: tuple[str, int], model, tx, params, batch_stats,
          opt_state, images, labels):
    if key not in self.compiled:
      start = time.perf_counter()
      compiled = make_step(model, tx).lower(
          params, batch_stats, opt_state, images, labels).compile()
      # A program's first run is some 50 ms slower than the next ones on
      # XLA:CPU; it runs once here, on copies (the step donates its inputs).
      jax.block_until_ready(compiled(*copy((params, batch_stats, opt_state)),
                                     images, labels))
      self.seconds[key] = time.perf_counter() - start
      self.flops[key] = float(compiled.cost_analysis()["flops"])
      self.compiled[key] = compiled
    return self.compiled[key]


class Evaluator:
  """Eval-mode logits on the test images, one jitted function per widths."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, blocks: int):
    self.images, self.labels = jnp.asarray(images), labels
    self.blocks = blocks
    self._functions: dict[tuple, Any] = {}

  def logits(self, widths: dict[str, int], params, batch_stats) -> jax.Array:
    key = tuple(sorted(widths.items()))
    if key not in self._functions:
      model = network(widths, self.blocks)
      self._functions[key] = jax.jit(lambda p, s, x: model.apply(
          {"params": p, "batch_stats": s}, x, train=False))
    return self._functions[key](params, batch_stats, self.images)

  def evaluate(self, widths, params, batch_stats) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy (finer-grained than accuracy)."""
    logits = self.logits(widths, params, batch_stats)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           self.labels)
    return (float(np.mean(np.argmax(np.asarray(logits), -1) == self.labels)),
            float(jnp.mean(loss)))


def batches(images, labels, batch_size: int, seed: int) -> Iterator:
  """Minibatches over as many epochs as asked for, the same for every method."""
  epoch = 0
  while True:
    yield from shuffled_batches(images, labels, batch_size, seed=seed,
                                epoch=epoch)
    epoch += 1


class Trainer:
  """One method trained with one seed, advanced a window of steps at a time.

  The trainers of a seed take turns window by window (:func:`train_seed`).
  At each of ``marks`` (the ends of the plan's stages and the evaluation
  steps) the trainer records the test accuracy against its training time;
  at the end of a stage, if it grows, it grows to the next stage's widths.
  """

  def __init__(self, method: Method, seed: int, plan: mo.GrowthPlan,
               eval_steps: list[int], args, splits, programs: Programs,
               evaluator: Evaluator, warmed: set):
    self.method, self.seed, self.plan = method, seed, plan
    self.programs, self.evaluator, self.warmed = programs, evaluator, warmed
    self.blocks, self.total = args.blocks, plan.total_steps
    self.layers = resnet_layers(self.blocks)
    self.stage_widths = (list(plan.widths) if method.grows
                         else [plan.widths[-1]])
    self.widths = dict(self.stage_widths[0])
    init_key, self.grow_key = jax.random.split(jax.random.key(seed))
    self.images = jnp.asarray(splits.train.images[:args.batch_size])
    self.labels = jnp.asarray(splits.train.labels[:args.batch_size])
    variables = network(self.widths, self.blocks).init(
        init_key, self.images, train=False)
    self.params = variables["params"]
    self.batch_stats = variables["batch_stats"]
    self.growth = mo.describe_widths(self.layers, self.params)
    self.tx = optimizer(method, self.total, mo.element_stages(
        self.params, self.layers, self.growth))
    self.opt_state = self.tx.init(self.params)
    self.data = batches(splits.train.images, splits.train.labels,
                        args.batch_size, seed)
    self.clock, self.growth_clock = Clock(), Clock()
    self.curve, self.preservation = [], []
    self.step, self.stage, self.loss = 0, 0, None
    self.growth_steps = set(plan.starts[1:]) if method.grows else set()
    self.marks = sorted(set(plan.starts[1:]) | set(eval_steps)
                        | {self.total})
    self.program_keys: list[tuple[str, int]] = []
    self.stage_steps: list[int] = []
    self.stage_seconds: list[float] = []
    self._program()

  def _program(self) -> None:
    """This stage's compiled step (compiled now, outside the clock)."""
    key = (self.method.program, self.stage)
    self.program = self.programs.get(
        key, network(self.widths, self.blocks), self.tx, self.params,
        self.batch_stats, self.opt_state, self.images, self.labels)
    self.program_keys.append(key)
    self.stage_steps.append(0)
    self.stage_seconds.append(0.0)

  def advance(self, to_step: int) -> None:
    """Trains up to global step ``to_step``, through the marks on the way."""
    while self.step < to_step:
      mark = next(m for m in self.marks if m > self.step)
      end = min(to_step, mark)
      jax.block_until_ready((self.params, self.batch_stats, self.opt_state))
      params, batch_stats, opt_state = (self.params, self.batch_stats,
                                        self.opt_state)
      with self.clock as clock:
        start = clock.seconds
        for _ in range(self.step, end):
          images, labels = next(self.data)
          params, batch_stats, opt_state, loss = self.program(
              params, batch_stats, opt_state, images, labels)
        jax.block_until_ready((params, batch_stats, opt_state, loss))
      self.stage_seconds[-1] += clock.seconds - start
      self.stage_steps[-1] += end - self.step
      self.params, self.batch_stats, self.opt_state = (params, batch_stats,
                                                       opt_state)
      self.step, self.loss = end, loss
      if end == mark:
        accuracy, loss = self.evaluator.evaluate(self.widths, self.params,
                                                 self.batch_stats)
        self.curve.append(dict(step=end, seconds=self.clock.seconds,
                               test_accuracy=accuracy, test_loss=loss))
        if end in self.growth_steps:
          self._grow()

  def _grow(self) -> None:
    """Grows to the next stage's widths; only the growth itself is timed."""
    method, end = self.method, self.step
    self.stage += 1
    new_widths = dict(self.stage_widths[self.stage])
    self.grow_key, key = jax.random.split(self.grow_key)
    params, batch_stats, opt_state, growth = (
        self.params, self.batch_stats, self.opt_state, self.growth)

    def grow():
      new_params, new_stats, new_growth, factors = mo.grow(
          params, batch_stats, self.layers, growth, new_widths, key=key,
          variance_transfer=method.variance_transfer)
      new_tx = optimizer(method, self.total, mo.element_stages(
          new_params, self.layers, new_growth))
      # Reset: zero momentum, but the count (the schedule's step) goes on.
      new_state = mo.grow_optimizer_state(new_tx, opt_state, new_params,
                                          factors,
                                          reset=not method.carry_state)
      return new_params, new_stats, new_growth, new_tx, new_state

    before = self.evaluator.logits(self.widths, params, batch_stats)
    warm_key = (method.program, method.variance_transfer, method.carry_state,
                self.stage)
    if warm_key not in self.warmed:
      # The first growth of each shape may compile small device programs
      # (the transfer of the new arrays): done once outside the clock.
      jax.block_until_ready(grow()[0])
      self.warmed.add(warm_key)
    with self.growth_clock, self.clock:
      (self.params, self.batch_stats, self.growth, self.tx,
       self.opt_state) = grow()
      jax.block_until_ready((self.params, self.batch_stats, self.opt_state))
    counts = schedule_counts(self.opt_state)
    if counts != {end}:
      raise AssertionError(
          f"{method.name}: the optimizer counts after growth are {counts}, "
          f"not the global step {end}: the schedule would restart.")
    self.widths = new_widths
    after = self.evaluator.logits(self.widths, self.params, self.batch_stats)
    error = float(jnp.max(jnp.abs(before - after)))
    self.preservation.append(dict(
        step=end, max_abs_error=error,
        relative_error=error / float(jnp.max(jnp.abs(before)))))
    self._program()

  def record(self) -> dict:
    stages = [dict(
        widths=dict(self.stage_widths[k[1]]), steps=n, seconds=s,
        ms_per_step=1e3 * s / n if n else None,
        flops_per_step=self.programs.flops[k])
              for k, n, s in zip(self.program_keys, self.stage_steps,
                                 self.stage_seconds)]
    return dict(
        method=self.method.name, seed=self.seed,
        test_accuracy=self.curve[-1]["test_accuracy"],
        test_loss=self.curve[-1]["test_loss"], train_loss=float(self.loss),
        train_seconds=self.clock.seconds,
        growth_seconds=self.growth_clock.seconds,
        flops=float(sum(s["flops_per_step"] * s["steps"] for s in stages)),
        compile_seconds=sum(self.programs.seconds[k]
                            for k in self.program_keys),
        preservation=self.preservation,
        preservation_max_error=max(
            (p["max_abs_error"] for p in self.preservation), default=0.0),
        stages=stages, curve=self.curve)


def train_seed(table, seed: int, plans: dict, args, splits,
               programs: Programs, evaluator: Evaluator,
               warmed: set) -> list[dict]:
  """Every method with one seed, taking turns an epoch at a time.

  Taking turns makes a change of load on the shared machine fall on every
  method alike; who goes first rotates from epoch to epoch.
  """
  steps_per_epoch = len(splits.train.labels) // args.batch_size
  eval_steps = [e * steps_per_epoch
                for e in range(args.eval_every, args.epochs, args.eval_every)]
  trainers = [Trainer(m, seed, plans[m.width_rate], eval_steps, args, splits,
                      programs, evaluator, warmed) for m in table]
  for epoch in range(args.epochs):
    turn = epoch % len(trainers)
    for trainer in trainers[turn:] + trainers[:turn]:
      trainer.advance((epoch + 1) * steps_per_epoch)
  return [t.record() for t in trainers]


def make_plan(final: dict[str, int], total: int, width_rate: float,
              args) -> tuple[mo.GrowthPlan, int]:
  """The plan, with the longest first stage that ``--grow-fraction`` allows."""
  def plan(first):
    return mo.growth_plan(final, total, first_stage_steps=first,
                          start_fraction=args.start_fraction,
                          width_rate=width_rate, length_rate=args.length_rate)

  if args.first_stage_steps:
    return plan(args.first_stage_steps), args.first_stage_steps
  best = None
  for first in range(1, total):
    try:
      if plan(first).starts[-1] > args.grow_fraction * total:
        break
    except ValueError:
      break
    best = first
  if best is None:
    raise ValueError(
        f"no first stage fits: {total} steps are too few for the stages of "
        f"width rate {width_rate}; raise --epochs or --grow-fraction.")
  return plan(best), best


def summarise(runs: list[dict], names: list[str]) -> list[dict]:
  """Per method: mean ± std accuracy (%), median time, ratios to full_width.

  The first name is the baseline.
  """
  rows = []
  for name in names:
    mine = [r for r in runs if r["method"] == name]
    accuracy = [100 * r["test_accuracy"] for r in mine]
    rows.append(dict(
        method=name, seeds=len(mine),
        test_accuracy_mean=statistics.mean(accuracy),
        test_accuracy_std=(statistics.stdev(accuracy) if len(mine) > 1
                           else 0.0),
        test_loss_mean=statistics.mean(r["test_loss"] for r in mine),
        test_loss_std=(statistics.stdev(r["test_loss"] for r in mine)
                       if len(mine) > 1 else 0.0),
        train_seconds_median=statistics.median(
            r["train_seconds"] for r in mine),
        growth_seconds_median=statistics.median(
            r["growth_seconds"] for r in mine),
        flops=statistics.mean(r["flops"] for r in mine),
        compile_seconds=mine[0]["compile_seconds"],
        preservation_max_error=max(r["preservation_max_error"]
                                   for r in mine)))
  base = rows[0]
  base_runs = [r for r in runs if r["method"] == base["method"]]
  for row in rows:
    row["time_ratio"] = (row["train_seconds_median"]
                         / base["train_seconds_median"])
    row["flops_ratio"] = row["flops"] / base["flops"]
    row["accuracy_vs_full_width"] = (row["test_accuracy_mean"]
                                     - base["test_accuracy_mean"])
    # Per seed, against the baseline of that seed (trained alongside).
    row["time_ratio_per_seed"] = [
        r["train_seconds"] / b["train_seconds"]
        for r, b in zip([r for r in runs if r["method"] == row["method"]],
                        base_runs)]
  return rows


def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Training seconds and test accuracy (%) at each mark, means over seeds."""
  seconds = np.mean([[p["seconds"] for p in r["curve"]] for r in runs], 0)
  accuracy = np.mean([[p["test_accuracy"] for p in r["curve"]] for r in runs],
                     0)
  return seconds, 100 * accuracy


def plot(path: Path, runs: list[dict], names: list[str], title: str) -> None:
  fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4.5))
  for name in names:
    seconds, accuracy = mean_curve([r for r in runs if r["method"] == name])
    for axis in (ax, zoom):
      axis.plot(seconds, accuracy, marker="o", markersize=3, label=name,
                linestyle="--" if name == "full_width" else "-")
  for axis in (ax, zoom):
    axis.set_xlabel("training wall-clock (s), compilation and evaluation "
                    "excluded")
    axis.grid(alpha=0.3)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  zoom.set_ylim(95, 100.2)
  zoom.set_title("the same, above 95%")
  zoom.legend(loc="lower right")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="one seed, fewer epochs (< 3 minutes)")
  parser.add_argument("--json", type=Path,
                      default=Path("results/growing/growing.json"))
  parser.add_argument("--plot", type=Path,
                      default=Path("results/growing/growing.png"))
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--eval-every", type=int,
                      help="epochs between evaluations for the curve")
  parser.add_argument("--stream", type=int, default=32,
                      help="final width of the residual stream")
  parser.add_argument("--hidden", type=int, default=32,
                      help="final inner width of every block")
  parser.add_argument("--blocks", type=int, default=3)
  parser.add_argument("--image-size", type=int, default=16)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--start-fraction", type=float, default=0.25)
  parser.add_argument("--width-rate", type=float, default=1.0,
                      help="the main plan's growth of a width per stage")
  parser.add_argument("--compare-width-rate", type=float, default=0.2,
                      help="the full method again on a plan with this width "
                           "rate (0: no such row)")
  parser.add_argument("--length-rate", type=float, default=0.2)
  parser.add_argument("--grow-fraction", type=float, default=0.6,
                      help="the share of the steps before the last stage, at "
                           "most (sets first_stage_steps)")
  parser.add_argument("--first-stage-steps", type=int,
                      help="overrides --grow-fraction")
  parser.add_argument("--state-scope", choices=("layer", "network"),
                      default="layer",
                      help="the rate adaptation's scope in +state")
  args = parser.parse_args(argv)
  args.epochs = args.epochs or (8 if args.quick else 30)
  args.seeds = args.seeds or (1 if args.quick else 3)
  args.eval_every = args.eval_every or (2 if args.quick else 3)
  if args.compare_width_rate == args.width_rate:
    args.compare_width_rate = 0.0

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  splits = load_digits_splits(image_size=args.image_size, seed=0)
  steps_per_epoch = len(splits.train.labels) // args.batch_size
  total = args.epochs * steps_per_epoch
  final = {"stream": args.stream} | {f"block{i}": args.hidden
                                     for i in range(args.blocks)}
  table = methods(args.state_scope, args.compare_width_rate or None)
  names = [m.name for m in table]
  plans, plan_records = {}, {}
  for rate in sorted({m.width_rate for m in table},
                    key=lambda r: (r is not None, r or 0.0)):
    plan, first = make_plan(final, total, rate or args.width_rate, args)
    plans[rate] = plan
    plan_records[rate] = dict(
        width_rate=rate or args.width_rate, first_stage_steps=first,
        widths=[dict(w) for w in plan.widths], starts=list(plan.starts),
        lengths=list(plan.lengths))
  print(f"{total} steps ({args.epochs} epochs of {steps_per_epoch}, batch "
        f"{args.batch_size}, {args.image_size}x{args.image_size}), "
        f"{args.seeds} seed(s)")
  for rate, record in plan_records.items():
    print(f"plan, width rate {record['width_rate']:g}: stream "
          f"{[w['stream'] for w in plans[rate].widths]}, block widths "
          f"{[w['block0'] for w in plans[rate].widths]}, stage lengths "
          f"{record['lengths']}")

  programs, warmed = Programs(), set()
  evaluator = Evaluator(splits.test.images, splits.test.labels, args.blocks)
  runs = []
  start = time.perf_counter()
  for seed in range(args.seeds):
    for r in train_seed(table, seed, plans, args, splits, programs,
                        evaluator, warmed):
      runs.append(r)
      print(f"seed {seed} {r['method']:<14} test acc "
            f"{100 * r['test_accuracy']:6.2f}%  train "
            f"{r['train_seconds']:6.1f} s (growth {r['growth_seconds']:.2f} s)"
            f"  {r['flops'] / 1e12:.3f} TFLOP  preservation "
            f"{r['preservation_max_error']:.1e}", flush=True)
  elapsed = time.perf_counter() - start

  rows = summarise(runs, names)
  print()
  print(f"{'method':<14} {'test acc. %':>13} {'test loss':>15} {'train s':>8} "
        f"{'× time':>7} {'× FLOPs':>8} {'compile s':>9}")
  for row in rows:
    print(f"{row['method']:<14} {row['test_accuracy_mean']:>6.2f} ± "
          f"{row['test_accuracy_std']:<4.2f} {row['test_loss_mean']:>7.4f} ± "
          f"{row['test_loss_std']:<6.4f} {row['train_seconds_median']:>8.1f} "
          f"{row['time_ratio']:>7.2f} {row['flops_ratio']:>8.3f} "
          f"{row['compile_seconds']:>9.1f}")
  full = next(row for row in rows if row["method"] == FULL_METHOD)
  preservation = max(row["preservation_max_error"] for row in rows)
  targets = dict(
      method=full["method"],
      accuracy_vs_full_width=full["accuracy_vs_full_width"],
      within_half_a_point=full["accuracy_vs_full_width"] >= -0.5,
      time_ratio=full["time_ratio"],
      at_most_three_quarters_time=full["time_ratio"] <= 0.75)
  print(f"(test acc., loss: mean ± std over seeds; train s: median over "
        f"seeds, compilation excluded; × time, × FLOPs: over full_width's; "
        f"the test set has {len(splits.test.labels)} images, one is "
        f"{100 / len(splits.test.labels):.2f} points)")
  print(f"targets: {full['method']} {full['accuracy_vs_full_width']:+.2f} "
        f"points against full_width (target >= -0.5), time × "
        f"{full['time_ratio']:.2f} (target <= 0.75); function preservation: "
        f"max |logits before - after| {preservation:.1e} over every growth; "
        f"benchmark took {elapsed:.0f} s")

  if args.plot:
    plot(args.plot, runs, names,
         f"GrowingResNet on digits, mean of {args.seeds} seed(s)")
  result = dict(
      backend=jax.default_backend(), jax_version=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""), quick=args.quick,
      config=vars(args) | dict(json=str(args.json), plot=str(args.plot),
                               total_steps=total,
                               steps_per_epoch=steps_per_epoch,
                               learning_rate=LEARNING_RATE,
                               momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                               final_widths=final),
      plans=list(plan_records.values()),
      methods=[dataclasses.asdict(m) for m in table],
      summary=rows, targets=targets,
      preservation_max_error=preservation, elapsed_seconds=elapsed,
      runs=runs)
  write_json(result, args.json)
  return result


if __name__ == "__main__":
  main()
