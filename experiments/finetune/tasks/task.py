"""What a task supplies to the shared fine-tuning experiment."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import optax

from experiments.data import LengthBuckets, Splits
from experiments.finetune.settings import Method, Rates, Settings

PyTree = Any
Pretrained = Any
Loss = Callable[..., tuple[Any, PyTree]]
Predict = Callable[[PyTree, Any], Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its data and its methods.

  Attributes:
    name: the ``--task`` option.
    model_name: the pretrained model, for titles.
    data_name: the default data, for titles and outputs.
    methods: every method, train-all first (its time is the others' budget).
    quick: settings of the quick run (the default).
    full: settings of the experiment as specified (``--full``).
    load_splits: ``(settings, path or None) -> Splits`` of
      :class:`~experiments.finetune.training.Examples`; ``None`` is the
      default data, a path the user's own.
    load_pretrained: ``() -> pretrained``, loaded once per experiment.
    fresh_variables: ``(pretrained, seed, num_classes) -> (model,
      variables)``: a copy of the pretrained variables (train steps donate
      their buffers) with a new classifier initialised from ``seed``.
    make_loss: ``(model, settings) -> loss(params, state, inputs, labels,
      key, step) -> (loss, state)``, dropout on, with a key folded from
      ``key`` and ``step``.
    make_predict: ``(model) -> predict(variables, inputs) -> classes``,
      jitted, in inference mode.
    make_optimizer: ``(method, rates, settings, steps) -> optimizer``: the
      optimizer of the trained subtree (plain methods) or of every parameter
      (multirate), its rates decayed over ``steps``; its numbers must live in
      its state (:mod:`experiments.finetune.optimizers`), so that one
      compiled step serves every run of a method.
    describe: ``settings -> str``, the task's part of a run's description.
    recipes: the recipe grids of the budget sweep with a recipe per budget
      (:mod:`experiments.finetune.recipes`): ``{family: ((method name,
      {rate: values}), ...)}``, every family's grid of the same size.
    bucketing: ``settings -> LengthBuckets or None``: token inputs cut, per
      batch, to the shortest bucket that fits its longest text (evaluation
      at every bucket, training at those its batches need,
      :func:`~experiments.finetune.training.train_buckets`); ``None`` (and
      the default): every batch at its stored shape.
  """
  name: str
  model_name: str
  data_name: str
  methods: Sequence[Method]
  quick: Settings
  full: Settings
  load_splits: Callable[[Settings, Optional[Path]], Splits]
  load_pretrained: Callable[[], Pretrained]
  fresh_variables: Callable[[Pretrained, int, int], tuple[nn.Module, PyTree]]
  make_loss: Callable[[nn.Module, Settings], Loss]
  make_predict: Callable[[nn.Module], Predict]
  make_optimizer: Callable[[Method, Rates, Settings, int],
                           optax.GradientTransformation]
  describe: Callable[[Settings], str]
  recipes: Mapping[str, Sequence[tuple[str, Mapping[str, tuple[float, ...]]]]
                   ] = dataclasses.field(default_factory=dict)
  bucketing: Optional[Callable[[Settings], Optional[LengthBuckets]]] = None

  def length_buckets(self, settings: Settings) -> Optional[LengthBuckets]:
    """The buckets of a run under ``settings`` (``None``: none)."""
    return None if self.bucketing is None else self.bucketing(settings)

  def method(self, name: str) -> Method:
    """The method called ``name``."""
    for method in self.methods:
      if method.name == name:
        return method
    raise ValueError(f"the {self.name} task has no method {name!r}; its "
                     f"methods are {[m.name for m in self.methods]}.")

  def methods_in(self, settings: Settings) -> tuple[Method, ...]:
    """The methods ``settings`` runs, in the task's order."""
    if settings.methods is None:
      return tuple(self.methods)
    for name in settings.methods:
      self.method(name)  # Refuses unknown names.
    return tuple(m for m in self.methods if m.name in settings.methods)
