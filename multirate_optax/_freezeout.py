"""FreezeOut: per-layer cosine learning rates, and layers frozen in order.

Each layer ``i`` (counted from the input) trains with its own cosine-annealed
learning rate that reaches zero at a fraction ``t_i`` of training; from then
on it is frozen. Layers freeze in order, so at any step the frozen layers are
a prefix of the network, and the train step neither differentiates them nor
backpropagates into them. The phases of the schedule are the sets of layers
still training.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax._groups import (
    Labels, check_labels_fit, labels_like, resolve_labels)
from multirate_optax._schedule import (
    Schedule, ScheduleState, Step)

PyTree = Any
Spacing = Literal["linear", "squared", "cubic"]
_EXPONENTS = {"linear": 1, "squared": 2, "cubic": 3}


def _check_whole(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{name} must be an int >= {minimum}, got {value!r} of type "
        f"{type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
  return int(value)


@dataclasses.dataclass(frozen=True)
class FreezeOutSchedule(Schedule):
  """When each layer freezes, and its learning-rate factor until then.

  Layer ``i`` of ``I + 1`` layers (``i = 0`` nearest the input, ``I`` the
  classifier) freezes at the fraction ``t_i`` of training, with
  ``r_i = t_0 + (1 - t_0) * i / I`` and ``t_i = r_i`` (linear), ``r_i**2``
  (squared) or ``r_i**3`` (cubic); the last layer has ``t_I = 1`` and trains to
  the end. At step ``t`` of ``T = total_steps`` (counted from 0) the layer's
  learning rate is ``alpha_i(t) = alpha_i(0) / 2 * (1 + cos(pi * t / (t_i T)))``
  while ``t < t_i T``, and it is frozen from its *freeze step*
  ``ceil(t_i T)`` on. ``alpha_i(0)`` is ``alpha / t_i`` (scaled) or ``alpha``
  (unscaled); :meth:`learning_rate_factor` gives ``alpha_i(t) / alpha``.

  The group of layer ``i`` is named ``str(i)``. Phase ``p`` holds the layers
  that are not frozen yet after the ``p``-th distinct freeze step; the last
  phase, from ``total_steps`` on, has no layer left.

  Attributes:
    num_layers: the number of layers, ``I + 1``.
    total_steps: the number of steps training will run, ``T``.
    t_0: ``r_0``, the first layer's freeze time before spacing, in
      ``(0, 1]``; ``t_0 = 1`` freezes no layer before the end (every layer
      then follows one cosine annealing over the whole run).
    spacing: ``'linear'``, ``'squared'`` or ``'cubic'``.
    scaled: start layer ``i`` at ``alpha / t_i`` instead of ``alpha``.
  """

  num_layers: int
  total_steps: int
  t_0: float = 0.8
  spacing: Spacing = "cubic"
  scaled: bool = True

  def __post_init__(self):
    _check_whole(self.num_layers, "num_layers", 1)
    _check_whole(self.total_steps, "total_steps", 1)
    if not 0.0 < self.t_0 <= 1.0:
      raise ValueError(f"t_0 must be in (0, 1], got {self.t_0!r}.")
    if self.spacing not in _EXPONENTS:
      raise ValueError(
          f"spacing must be one of {sorted(_EXPONENTS)}, got {self.spacing!r}.")

  @property
  def freeze_fractions(self) -> tuple[float, ...]:
    """``t_i`` of every layer, the fraction of training at which it freezes."""
    last = self.num_layers - 1
    exponent = _EXPONENTS[self.spacing]
    return tuple(
        (self.t_0 + (1.0 - self.t_0) * i / last if last else 1.0) ** exponent
        for i in range(self.num_layers))

  @property
  def freeze_steps(self) -> tuple[int, ...]:
    """The first step at which each layer is frozen, ``ceil(t_i T)``."""
    # Rounding first keeps float noise (0.8**3 * 1000 = 512.0000000000001)
    # from moving a freeze step by one.
    return tuple(math.ceil(round(t * self.total_steps, 6))
                 for t in self.freeze_fractions)

  @property
  def _boundaries(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.freeze_steps)))

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return tuple(
        frozenset(str(i) for i, s in enumerate(self.freeze_steps) if s > start)
        for start in (0,) + self._boundaries)

  def phase(self, step: Step) -> Step:
    if isinstance(step, (int, np.integer)):
      return bisect.bisect_right(self._boundaries, int(step))
    return jnp.sum(step >= jnp.asarray(self._boundaries, jnp.int32),
                   dtype=jnp.int32)

  def is_frozen(self, layer: int, step: Step) -> Step:
    """Whether ``layer`` is frozen at ``step``."""
    return step >= self.freeze_steps[layer]

  def learning_rate_factor(self, layer: int, step: Step) -> Step:
    """``alpha_i(t) / alpha`` of ``layer`` at ``step``: 0 once it is frozen.

    A Python float for an int ``step``, a float32 array for an array.
    """
    t_i = self.freeze_fractions[layer]
    initial = 1.0 / t_i if self.scaled else 1.0
    period = t_i * self.total_steps
    if isinstance(step, (int, np.integer)):
      if self.is_frozen(layer, step):
        return 0.0
      return initial * 0.5 * (1.0 + math.cos(math.pi * step / period))
    progress = jnp.minimum(step.astype(jnp.float32) / period, 1.0)
    factor = initial * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(self.is_frozen(layer, step), 0.0, factor)


def layers_by_module(params: Mapping[str, Any]) -> dict[str, int]:
  """Numbers the top-level modules of Flax parameters in network order.

  The order is the insertion order of the top-level mapping, which for Flax
  parameters is the order in which the modules were created (``Dense_10``
  after ``Dense_9``, unlike the sorted order of ``jax.tree.leaves``). Merge or
  reorder entries of the result to make other layers.

  Args:
    params: parameters whose top level maps module names to their parameters.

  Returns:
    ``{module name: layer index}``, usable as ``layers`` of :func:`freezeout`
    and :func:`keep_frozen`.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> params = {'Conv_0': {'kernel': jnp.ones(3)},
    ...           'Dense_0': {'kernel': jnp.ones(2)}}
    >>> mo.layers_by_module(params)
    {'Conv_0': 0, 'Dense_0': 1}
  """
  if not isinstance(params, Mapping):
    raise TypeError(
        "layers_by_module needs parameters whose top level is a mapping of "
        f"module names, got {type(params).__name__}.")
  return {name: index for index, name in enumerate(params)}


def _resolve_layers(layers: Labels, tree: PyTree, num_layers: int,
                    what: str) -> tuple[int, ...]:
  """The layer index of every leaf of ``tree``."""
  label_tree = layers(tree) if callable(layers) else layers
  if isinstance(label_tree, Mapping) and isinstance(tree, Mapping):
    # A {module: layer} mapping covers any tree of some of those modules,
    # e.g. the batch statistics, which only normalising modules have.
    missing = [name for name in tree if name not in label_tree]
    if missing:
      raise ValueError(
          f"{what} has top-level entries {missing} that layers does not "
          f"number; layers has {list(label_tree)}.")
    label_tree = {name: label_tree[name] for name in tree}
  try:  # The quick check of keep_frozen's every call ...
    per_leaf = jax.tree.leaves(jax.tree.broadcast(label_tree, tree))
  except (ValueError, TypeError):
    per_leaf = []
  if len(per_leaf) != len(jax.tree.leaves(tree)) or not all(
      isinstance(layer, (int, np.integer)) and not isinstance(layer, bool)
      and 0 <= layer < num_layers for layer in per_leaf):
    # ... and on failure the thorough one, whose message names the leaf.
    per_leaf = resolve_labels(label_tree, tree, range(num_layers))
  return tuple(int(layer) for layer in per_leaf)


def _frozen_layer(
    optimizer: optax.GradientTransformationExtraArgs,
    schedule: FreezeOutSchedule,
    layer: int,
    count: Union[jax.Array, None],
) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` scaled by the layer's factor, and held once it is frozen."""

  def update_fn(updates, state, params=None, **extra_args):
    def train():
      new_updates, new_state = optimizer.update(
          updates, state, params, **extra_args)
      factor = schedule.learning_rate_factor(layer, count)
      return jax.tree.map(lambda u: (u * factor).astype(u.dtype),
                          new_updates), new_state

    def frozen():
      shapes, _ = jax.eval_shape(train)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state

    return jax.lax.cond(schedule.is_frozen(layer, count), frozen, train)

  return optax.GradientTransformationExtraArgs(optimizer.init, update_fn)


def freezeout(
    optimizer: optax.GradientTransformation,
    schedule: FreezeOutSchedule,
    *,
    layers: Labels,
) -> optax.GradientTransformationExtraArgs:
  """FreezeOut: layer-wise cosine learning rates, freezing layers in order.

  Each layer has its own copy of ``optimizer`` (its own momentum, say), whose
  updates are multiplied by the layer's ``schedule.learning_rate_factor`` at
  the current step: with ``optimizer = optax.sgd(alpha, ...)`` layer ``i``
  moves with rate ``alpha_i(t)``. From its freeze step on, a layer gets
  exactly zero update and its optimizer state is left untouched.

  The frozen layers are always the first ones, so a train step built with
  :func:`multirate_optax.train_step` does no backward work for them, nor
  below them: their parameters are not differentiated and the backward pass
  stops at the first layer still training. ``'host'`` dispatch compiles one
  program per phase (the set of layers still training) met.

  Put everything that changes parameters into ``optimizer`` (weight decay
  included): a transformation chained outside FreezeOut would still move
  frozen layers. Batch-norm statistics are not parameters: keep those of
  frozen layers with :func:`keep_frozen`.

  Args:
    optimizer: the optimizer of one layer, with the base learning rate
      ``alpha`` (0.1 in the paper; SGD with Nesterov momentum 0.9 and weight
      decay ``1e-4``).
    schedule: the :class:`FreezeOutSchedule`, with the number of steps
      training will really run.
    layers: the layer index (``0 .. schedule.num_layers - 1``, from the input)
      of each parameter, as a pytree with the parameters' structure or a
      prefix of it (``{'conv': 0, 'block': 1, 'head': 2}``), or a callable
      returning one such as :func:`layers_by_module`. Every layer must have at
      least one parameter.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScheduleState` with ``schedule``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'conv': jnp.ones(2), 'head': jnp.ones(2)}
    >>> schedule = mo.FreezeOutSchedule(num_layers=2, total_steps=10, t_0=0.5,
    ...                                 spacing='linear')
    >>> schedule.freeze_steps
    (5, 10)
    >>> tx = mo.freezeout(optax.sgd(0.1), schedule, layers=mo.layers_by_module)
    >>> def loss_fn(params):
    ...   return jnp.sum(params['conv'] + params['head'])
    >>> step = mo.train_step(loss_fn, tx)
    >>> opt_state = tx.init(params)
    >>> for _ in range(10):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> # conv: 1 - 0.1 / 0.5 * (5 + 1) / 2 (frozen from step 5);
    >>> # head: 1 - 0.1 * (10 + 1) / 2.
    >>> round(float(params['conv'][0]), 4), round(float(params['head'][0]), 4)
    (0.4, 0.45)

  References:
    Brock, Lim, Ritchie, Weston, `FreezeOut: Accelerate Training by
    Progressively Freezing Layers <https://arxiv.org/abs/1706.04983>`_, 2017.
  """
  if not isinstance(schedule, FreezeOutSchedule):
    raise TypeError(
        f"schedule must be a FreezeOutSchedule, got {type(schedule).__name__}.")
  optimizer = optax.with_extra_args_support(optimizer)
  groups = tuple(str(i) for i in range(schedule.num_layers))

  def partition(count, per_leaf_labels):
    return optax.partition(
        {group: _frozen_layer(optimizer, schedule, i, count)
         for i, group in enumerate(groups)},
        per_leaf_labels)

  def init_fn(params):
    per_leaf = _resolve_layers(layers, params, schedule.num_layers, "params")
    empty = sorted(set(range(schedule.num_layers)) - set(per_leaf))
    if empty:
      raise ValueError(
          f"layers {empty} have no parameters; the schedule has "
          f"{schedule.num_layers} layers, numbered 0 to "
          f"{schedule.num_layers - 1}, and each needs at least one.")
    labels = tuple(groups[i] for i in per_leaf)
    inner = partition(None, labels_like(labels)).init(params)
    return ScheduleState(count=jnp.zeros([], jnp.int32), inner=inner,
                         schedule=schedule, labels=labels)

  def update_fn(updates, state, params=None, **extra_args):
    check_labels_fit(state.labels, updates, "the updates")
    updates, inner = partition(state.count, labels_like(state.labels)).update(
        updates, state.inner, params, **extra_args)
    return updates, state.advanced(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_frozen(
    new: PyTree,
    old: PyTree,
    schedule: FreezeOutSchedule,
    *,
    layers: Labels,
    step: Step,
) -> PyTree:
  """``new``, with the leaves of layers frozen at ``step`` taken from ``old``.

  Use it on batch-norm statistics, so that those of frozen layers stop
  updating, as in the reference implementation (which also switches the
  frozen layers' batch norm to its running averages in the forward pass;
  here the model decides how it normalises).

  Args:
    new: the values the train step at ``step`` produced (e.g. ``batch_stats``).
    old: the values before that step, with the structure of ``new``.
    schedule: the schedule given to :func:`freezeout`.
    layers: the layer index of each leaf of ``new``, as for :func:`freezeout`;
      the ``{module: layer}`` mapping given there works as it is.
    step: the index of the train step (from 0) that produced ``new``. With a
      Python int the choice is made on the host and no device work is done.

  Returns:
    A tree with the structure of ``new``.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> schedule = mo.FreezeOutSchedule(num_layers=2, total_steps=10, t_0=0.5)
    >>> layers = {'bn': 0, 'head': 1}
    >>> old = {'bn': {'mean': jnp.zeros(2)}}
    >>> new = {'bn': {'mean': jnp.ones(2)}}
    >>> mo.keep_frozen(new, old, schedule, layers=layers, step=2)['bn']['mean']
    Array([0., 0.], dtype=float32)
  """
  per_leaf = _resolve_layers(layers, new, schedule.num_layers, "new")
  new_leaves, treedef = jax.tree.flatten(new)
  old_leaves = jax.tree.leaves(old)
  if len(old_leaves) != len(new_leaves):
    raise ValueError(
        f"old has {len(old_leaves)} leaves and new {len(new_leaves)}; they "
        "need the same structure.")
  if isinstance(step, (int, np.integer)):
    kept = [o if schedule.is_frozen(layer, step) else n
            for n, o, layer in zip(new_leaves, old_leaves, per_leaf)]
  else:
    kept = [jnp.where(schedule.is_frozen(layer, step), o, n)
            for n, o, layer in zip(new_leaves, old_leaves, per_leaf)]
  return jax.tree.unflatten(treedef, kept)
