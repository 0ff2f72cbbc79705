"""What a fine-tuning method is, the settings of a run, and parameter roles.

A method gives every parameter a role by its top-level module: plain methods
train some modules (all of them for train-all) and freeze the rest; multirate
methods (:func:`multirate_optax.multirate`) make some modules fast and all
others slow. Each task (:mod:`experiments.finetune.tasks`) lists its methods,
their rate grids and its quick and full settings; everything here is shared
by the tasks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax

import multirate_optax as mo

PyTree = Any
Rates = dict[str, float]


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
    budget_fraction: the share of train-all's time the method plans to
      fill (its rates decay over that plan, and it stops there); below 1 for
      a run meant to be finished, not interrupted, at an earlier budget.
    rate_names: the learning rates the task's optimizer takes for this
      method (each picked from a grid on validation).
    timetable: a timetable of the library other than two-rate multirate,
      built by the task's optimizer and trained with
      :func:`multirate_optax.train_step`: ``'multirate_groups'``
      (:func:`multirate_optax.multirate_groups`, a period per group of
      ``periods``) or ``'gradual_unfreezing'``
      (:func:`multirate_optax.gradual_unfreezing`, the task's groups top-down,
      one more at evenly spaced points of the run); ``None`` otherwise.
    periods: ``'multirate_groups'``: ``{group: period}`` as pairs, the
      groups the task's.
    discriminative: ``'gradual_unfreezing'``: each group's rate is the one
      above's divided by this (ULMFiT: 2.6; 1: one rate for all).
    layerwise_decay: the method's updates (a plain method's, or a
      timetable's, multirate's included) times ``decay ** depth``
      (:func:`multirate_optax.layerwise_decay`, depths the task's); ``None``:
      none.
  """
  name: str
  label: str
  trained: Optional[tuple[str, ...]] = None
  fast: Optional[tuple[str, ...]] = None
  drift: bool = False
  period: Optional[int] = None
  budget_fraction: float = 1.0
  rate_names: tuple[str, ...] = ()
  timetable: Optional[str] = None
  periods: Optional[tuple[tuple[str, int], ...]] = None
  discriminative: float = 1.0
  layerwise_decay: Optional[float] = None

  def __post_init__(self):
    if self.timetable not in (None, "multirate_groups", "gradual_unfreezing"):
      raise ValueError(
          f"timetable of {self.name!r} must be None, 'multirate_groups' or "
          f"'gradual_unfreezing', got {self.timetable!r}.")
    if (self.timetable == "multirate_groups") != (self.periods is not None):
      raise ValueError(
          f"{self.name!r}: periods go with timetable='multirate_groups' "
          f"and only with it; got timetable={self.timetable!r}, "
          f"periods={self.periods!r}.")
    if not 0.0 < self.budget_fraction <= 1.0:
      raise ValueError(f"budget_fraction of {self.name!r} must be in (0, 1], "
                       f"got {self.budget_fraction!r}.")

  @property
  def multirate(self) -> bool:
    return self.fast is not None

  @property
  def train_all(self) -> bool:
    """Every parameter trained on every step: the baseline whose time is
    every other method's budget."""
    return (not self.timetabled and self.trained is None
            and self.layerwise_decay is None and self.budget_fraction == 1.0)

  @property
  def timetabled(self) -> bool:
    """Trained with :func:`multirate_optax.train_step` (two-rate multirate or
    another timetable), its optimizer over every parameter."""
    return self.multirate or self.timetable is not None

  def period_in(self, settings: Settings) -> int:
    """k of this method under ``settings``."""
    if self.periods is not None:  # The cycle: lcm of the groups' periods.
      return math.lcm(*(period for _, period in self.periods))
    return settings.period if self.period is None else self.period


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that defines a run of the experiment.

  Shared fields first, then those of one task (ignored by the other).

  Attributes:
    task: ``'vision'``, ``'mnist'`` (the vision task's model on other
      digits: the vision fields apply), ``'text'`` or ``'trec'`` (the text
      task's model on other texts: the text fields apply).
    epochs: train-all's passes over the train split (a fraction of one
      allowed: that share of an epoch's steps). Train-all's training
      time on a seed is every other method's time budget on that seed; the
      others plan as many steps as fit in it (see
      :mod:`experiments.finetune.budget`), at most ``max_epochs_factor``
      times these epochs.
    seeds: seeds of the reported runs (classifier init, batch order,
      dropout); rates are selected on the first seed's runs.
    grids: for each method name, the candidate values of each of its rates.
    methods: names of the task's methods to run (``None``: all of them).
    batch_size: examples per step.
    period: k, steps per multirate cycle.
    evaluations: evaluation points over a run's planned steps, evenly spaced
      (and one before the first step).
    max_epochs_factor: cap on a method's planned epochs, in train-alls.
    split_seed: seed of the train/validation/test split.
    quick: a reduced run (fewer epochs, seeds, examples and grid points).
    clock: what training time is: ``'wall'`` (wall-clock seconds) or
      ``'process'`` (CPU seconds of this process, all its threads: on a
      machine shared with other jobs, much less disturbed by their load than
      wall-clock time, which stretches by however much of the CPU they take).
    image_size: vision: side of the RGB digit images.
    momentum: vision: SGD momentum of every method.
    bn: vision: ``'frozen'`` or ``'train'``, see
      :mod:`experiments.finetune.tasks.vision`.
    max_length: text: tokens per text ([CLS] and [SEP] included).
    weight_decay: text: AdamW's decoupled weight decay.
    split_sizes: text: at most this many train, validation and test
      examples (``None``: the whole split), for quick runs.
    bucketing: text: each batch cut to the shortest multiple of 8 tokens
      (or ``max_length``) that fits its longest text, rather than padded to
      ``max_length``; the train batches hold the same texts in the same
      order (:mod:`experiments.finetune.tasks.text`). ``False``: every batch
      at ``max_length``.
  """
  task: str
  epochs: float
  seeds: tuple[int, ...]
  grids: Mapping[str, Mapping[str, tuple[float, ...]]]
  methods: Optional[tuple[str, ...]] = None
  batch_size: int = 32
  period: int = 5
  evaluations: int = 10
  max_epochs_factor: float = 8.0
  split_seed: int = 0
  quick: bool = False
  clock: str = "wall"
  image_size: int = 32
  momentum: float = 0.9
  bn: str = "frozen"
  max_length: int = 64
  weight_decay: float = 0.01
  split_sizes: Optional[tuple[Optional[int], Optional[int],
                              Optional[int]]] = None
  bucketing: bool = True

  def __post_init__(self):
    if self.task not in ("vision", "mnist", "text", "trec"):
      raise ValueError(f"task must be 'vision', 'mnist', 'text' or 'trec', "
                       f"got {self.task!r}.")
    if self.clock not in ("wall", "process"):
      raise ValueError(
          f"clock must be 'wall' or 'process', got {self.clock!r}.")
    if self.bn not in ("frozen", "train"):
      raise ValueError(f"bn must be 'frozen' or 'train', got {self.bn!r}.")
    if self.evaluations < 1:
      raise ValueError(
          f"evaluations must be at least 1, got {self.evaluations!r}.")


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
