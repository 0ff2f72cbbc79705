"""FreezeOut against the same training without it: accuracy, estimated and measured saving.

A small ResNet with batch norm (stem, six residual blocks, classifier: eight
FreezeOut layers, one per top-level module) is trained from scratch on
scikit-learn's digits, up-sampled to 16x16, with SGD (Nesterov momentum 0.9,
weight decay 5e-4, rate 0.1). The baseline anneals the rate with one cosine
over the whole run (plain optax, every layer every step); FreezeOut gives each
layer its own cosine and freezes it at ``t_i`` (linear and cubic spacing,
``t_0`` in {0.5, 0.8}, scaled rates). All runs start from the same weights and
see the same minibatches. For each FreezeOut run:

  estimated saving  1 - sum_p steps_p * flops_p / (steps * flops_0), from XLA's
                    cost analysis of each phase's compiled program
                    (multirate_optax.estimate_saving);
  measured saving   1 - training time / baseline training time, wall-clock of
                    whole runs; the baseline is trained again alongside each
                    FreezeOut run, an epoch of each in turn, so that both see
                    the same load on the machine (compilation excluded: every
                    program is compiled before the clock starts);
  per-phase saving  the estimate with flops_p / flops_0 replaced by the
                    measured time of a step of phase p over that of a plain
                    step (median over blocks of steps timed in alternation);
  all-active / plain  that ratio for phase 0, where every layer trains: the
                    overhead of FreezeOut's step over a plain optax step
                    doing the same work (1.0 is none).

Run from the repository root::

  python -m benchmarks.freezeout --quick --json results/freezeout.json

On CPU the train step uses 'host' dispatch (one program per phase), since
XLA:CPU runs convolution weight gradients inside lax.cond on a slow path.
XLA:CPU's conv speed depends on XLA_FLAGS (the benchmark does not set any;
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` is much faster on some
machines); it is recorded in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json
from experiments.data import load_digits_splits, shuffled_batches

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
BN_MOMENTUM = 0.9  # PyTorch's default (Flax's 0.99 is too slow for short runs)
VARIANTS = (("linear", 0.5), ("linear", 0.8), ("cubic", 0.5), ("cubic", 0.8))


class ConvNorm(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)
    return nn.relu(x)


class ResidualBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda y: nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM)(y)
    y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
    y = nn.relu(norm(y))
    y = norm(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm(nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem, three stages of residual blocks, classifier, as top-level modules.

  Stage ``s`` has ``blocks`` blocks of ``width * 2**s`` channels, the first
  of the second and third stages with stride 2.
  """

  width: int = 16
  blocks: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = ConvNorm(self.width)(x, train)
    for stage in range(3):
      for block in range(self.blocks):
        stride = 2 if stage and not block else 1
        x = ResidualBlock(self.width * 2**stage, stride)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def make_loss(model: nn.Module):
  def loss_fn(params, batch_stats, images, labels):
    logits, updated = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), updated["batch_stats"]

  return loss_fn


def sgd(learning_rate) -> optax.GradientTransformation:
  return optax.chain(
      optax.add_decayed_weights(WEIGHT_DECAY),
      optax.sgd(learning_rate, momentum=MOMENTUM, nesterov=True))


def plain_step(loss_fn, tx):
  """The baseline: gradients of every parameter, on every step."""

  def step(params, opt_state, batch_stats, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, (loss, batch_stats)

  return jax.jit(step, donate_argnums=(0, 1))


def copy(tree):
  return jax.tree.map(jnp.array, tree)


def at_step(opt_state, step: int):
  """The FreezeOut state with its count set to ``step``."""
  return dataclasses.replace(opt_state, count=jnp.asarray(step, jnp.int32))


def phase_starts(timetable: mo.FreezeOutTimetable) -> list[tuple[int, int]]:
  """``(phase, first step)`` of every phase met in training."""
  starts = []
  for t in range(timetable.total_steps):
    if not starts or timetable.phase(t) != starts[-1][0]:
      starts.append((timetable.phase(t), t))
  return starts


class Run:
  """A training run, advanced one epoch at a time and timed per epoch.

  Every program the run needs must already be compiled.
  """

  def __init__(self, step, params, opt_state, batch_stats, splits, args,
               timetable=None, layers=None):
    self.step, self.splits, self.args = step, splits, args
    self.timetable, self.layers = timetable, layers
    self.params, self.opt_state = copy(params), copy(opt_state)
    self.batch_stats = batch_stats
    self.steps, self.seconds, self.loss = 0, 0.0, None

  def epoch(self, epoch: int) -> None:
    jax.block_until_ready((self.params, self.opt_state, self.batch_stats))
    start = time.perf_counter()
    for images, labels in shuffled_batches(
        self.splits.train.images, self.splits.train.labels,
        self.args.batch_size, seed=self.args.seed, epoch=epoch):
      self.params, self.opt_state, (self.loss, new_stats) = self.step(
          self.params, self.opt_state, self.batch_stats, images, labels)
      self.batch_stats = new_stats if self.timetable is None else mo.keep_frozen(
          new_stats, self.batch_stats, self.timetable, layers=self.layers,
          step=self.steps)
      self.steps += 1
    jax.block_until_ready((self.params, self.batch_stats))
    self.seconds += time.perf_counter() - start


def accuracy(model, params, batch_stats, dataset) -> float:
  logits = jax.jit(lambda p, s, x: model.apply(
      {"params": p, "batch_stats": s}, x, train=False))(
          params, batch_stats, dataset.images)
  return float(np.mean(np.argmax(logits, axis=-1) == dataset.labels))


def time_block(step, params, opt_state, batch_stats, images, labels,
               steps: int) -> float:
  """Mean time per step of ``steps`` chained steps, on copies of the state.

  ``step`` must be compiled already.
  """
  params, opt_state = copy(params), copy(opt_state)
  jax.block_until_ready((params, opt_state))
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, value = step(params, opt_state, batch_stats, images,
                                    labels)
  jax.block_until_ready(value)
  return (time.perf_counter() - start) / steps


def relative_step_time(step, opt_state, baseline, base_state, params,
                       batch_stats, images, labels, steps: int,
                       repeats: int) -> float:
  """Median of t(step) / t(baseline) over blocks timed in alternation.

  Alternating cancels most of the drift of other load on a shared machine.
  """
  ratios = []
  for _ in range(repeats):
    base = time_block(baseline, params, base_state, batch_stats, images,
                      labels, steps)
    ratios.append(time_block(step, params, opt_state, batch_stats, images,
                             labels, steps) / base)
  return statistics.median(ratios)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer epochs and a narrower net (< 3 minutes)")
  parser.add_argument("--json", type=Path, help="write the results to this file")
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--width", type=int)
  parser.add_argument("--blocks", type=int,
                      help="residual blocks per stage (layers: 2 + 3 * blocks)")
  parser.add_argument("--image-size", type=int, default=16)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--repeats", type=int,
                      help="timed blocks of steps of each phase")
  parser.add_argument("--block", type=int, help="steps per timed block")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.epochs = args.epochs or (6 if args.quick else 30)
  args.width = args.width or (8 if args.quick else 16)
  args.blocks = args.blocks or (1 if args.quick else 2)
  args.block = args.block or (5 if args.quick else 10)
  args.repeats = args.repeats or (2 if args.quick else 3)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"dispatch {mo.resolve_dispatch('auto')!r}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  splits = load_digits_splits(image_size=args.image_size, seed=args.seed)
  steps_per_epoch = len(splits.train.labels) // args.batch_size
  total_steps = args.epochs * steps_per_epoch
  model = ResNet(width=args.width, blocks=args.blocks)
  variables = model.init(jax.random.key(args.seed),
                         splits.train.images[:args.batch_size], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  layers = mo.layers_by_module(params)
  images = jnp.asarray(splits.train.images[:args.batch_size])
  labels = jnp.asarray(splits.train.labels[:args.batch_size])
  loss_fn = make_loss(model)
  print(f"{len(layers)} layers {list(layers)}, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, "
        f"{total_steps} steps ({args.epochs} epochs of {steps_per_epoch})")

  tx = sgd(optax.cosine_decay_schedule(LEARNING_RATE, total_steps))
  base_step = plain_step(loss_fn, tx)
  base_state = tx.init(params)
  base_flops = base_step.lower(params, base_state, batch_stats, images,
                               labels).compile().cost_analysis()["flops"]
  base_step(copy(params), copy(base_state), batch_stats, images, labels)

  baseline = dict(flops=base_flops, seconds=[])

  rows = []
  for spacing, t_0 in VARIANTS:
    timetable = mo.FreezeOutTimetable(num_layers=len(layers),
                                    total_steps=total_steps, t_0=t_0,
                                    spacing=spacing)
    freeze = mo.freezeout(sgd(LEARNING_RATE), timetable, layers=layers)
    opt_state = freeze.init(params)
    # Donating, as the baseline's step does: a step that keeps its inputs
    # writes new buffers each time, a few percent on this model.
    step = mo.train_step(loss_fn, freeze, has_aux=True, dispatch="host",
                         donate=True)
    # Compiles the program of every phase met; the train step finds them.
    estimate = mo.estimate_saving(step, params, opt_state, batch_stats, images,
                                  labels)
    relative_times = [
        relative_step_time(
            step.program(params, opt_state, batch_stats, images, labels,
                         phase=p).compile(),
            at_step(opt_state, start), base_step, base_state, params,
            batch_stats, images, labels, args.block, args.repeats)
        for p, start in phase_starts(timetable)]
    met = [n for n in estimate.steps_per_phase if n]
    # The baseline is trained again alongside each run, epoch by epoch in
    # turn, so that both see the same load on the machine.
    base = Run(base_step, params, base_state, batch_stats, splits, args)
    run = Run(step, params, opt_state, batch_stats, splits, args, timetable,
              layers)
    for epoch in range(args.epochs):
      base.epoch(epoch)
      run.epoch(epoch)
    assert run.steps == total_steps
    if "test_accuracy" not in baseline:
      baseline.update(train_loss=float(base.loss), test_accuracy=accuracy(
          model, base.params, base.batch_stats, splits.test))
      print(f"no FreezeOut: test accuracy {baseline['test_accuracy']:.4f}")
    seconds, base_seconds, loss = run.seconds, base.seconds, float(run.loss)
    acc = accuracy(model, run.params, run.batch_stats, splits.test)
    r = dict(
        spacing=spacing, t_0=t_0, freeze_steps=timetable.freeze_steps,
        steps_per_phase=estimate.steps_per_phase,
        phase_flops=estimate.phase_flops,
        phase_time_over_baseline=relative_times,
        estimated_saving=estimate.saving,
        measured_saving=1 - seconds / base_seconds,
        per_phase_saving=1 - sum(
            n * t for n, t in zip(met, relative_times)) / total_steps,
        seconds=seconds, baseline_seconds=base_seconds, train_loss=loss,
        test_accuracy=acc,
        relative_accuracy_loss=1 - acc / baseline["test_accuracy"])
    r["measured_over_estimate"] = r["measured_saving"] / r["estimated_saving"]
    r["all_active_over_plain"] = relative_times[0]
    rows.append(r)
    baseline["seconds"].append(base_seconds)
    print(f"{spacing} t_0={t_0}: {seconds:.1f} s against {base_seconds:.1f} s, "
          f"estimated saving {r['estimated_saving']:.3f}, measured "
          f"{r['measured_saving']:.3f}, test accuracy {acc:.4f}", flush=True)

  print()
  print(f"{'timetable':<16} {'test acc':>8} {'rel. loss':>9} {'estimate':>8} "
        f"{'measured':>8} {'meas/est':>8} {'per-phase':>9} {'time s':>7} "
        f"{'base s':>7} {'all-active/plain':>16}")
  print(f"{'no FreezeOut':<16} {baseline['test_accuracy']:>8.4f}")
  for r in rows:
    print(f"{r['spacing'] + ' t_0=' + str(r['t_0']):<16} "
          f"{r['test_accuracy']:>8.4f} {r['relative_accuracy_loss']:>9.2%} "
          f"{r['estimated_saving']:>8.1%} {r['measured_saving']:>8.1%} "
          f"{r['measured_over_estimate']:>8.2f} {r['per_phase_saving']:>9.1%} "
          f"{r['seconds']:>7.1f} {r['baseline_seconds']:>7.1f} "
          f"{r['all_active_over_plain']:>16.3f}")
  print("(all-active/plain: time of a step of phase 0, every layer training, "
        "over a plain optax step; flops: "
        + ", ".join(f"{r['phase_flops'][0] / base_flops:.3f}" for r in rows)
        + ")")
  result = dict(backend=jax.default_backend(), jax_version=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), quick=args.quick,
                config=vars(args) | dict(total_steps=total_steps,
                                         json=str(args.json)),
                baseline=baseline, rows=rows)
  write_json(result, args.json)
  return result


if __name__ == "__main__":
  main()
