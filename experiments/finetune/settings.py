"""What the fine-tuning experiment compares, and the settings of a run.

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

A method gives every parameter a role (:func:`leaf_roles`) by its top-level
module of :class:`experiments.models.EfficientNetLite0`.

Learning rates: a plain method has one, a multirate method two (the fast and
the slow rate, see :mod:`experiments.finetune.training`), each picked from a
small fixed grid (:mod:`experiments.finetune.selection`): ``FULL_GRIDS`` for
the experiment as specified, ``QUICK_GRIDS`` the full run's selections.

BatchNorm (``--bn``): ``frozen`` (default) keeps the pretrained running
statistics and normalises with them (inference mode) while training, with
dropout and stochastic depth on; ``train`` normalises with batch statistics
and updates the running averages, as ``model.train()`` in PyTorch. With
frozen statistics the ImageNet features transfer far better to these small
images (a PyTorch probe: train-all 97.8% frozen vs 74.5% train). BatchNorm
scales and offsets are parameters, trained like the rest of their module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import jax

from experiments.models import stage_block_names
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
