"""FreezeOut: per-layer cosine learning rates, and layers frozen in order.

Each layer ``i`` (counted from the input) trains with its own cosine-annealed
learning rate that reaches zero at a fraction ``t_i`` of training; from then
on it is frozen. Layers freeze in order, so at any step the frozen layers are
a prefix of the network, and the train step neither differentiates them nor
backpropagates into them. The phases of its timetable are the sets of layers
still training.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax.core._checks import whole_number
from multirate_optax.core._groups import Labels, resolve_labels
from multirate_optax.core._timetable import Step, Timetable
from multirate_optax.core._timetabled import gated, timetabled

PyTree = Any
Spacing = Literal["linear", "squared", "cubic"]
_EXPONENTS = {"linear": 1, "squared": 2, "cubic": 3}


@dataclasses.dataclass(frozen=True)
class FreezeOutTimetable(Timetable):
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
  phase, from ``total_steps`` on, has no layer left. (A timetable of which
  layers train, with their learning-rate factors; not an ``optax.Schedule``.)

  Attributes:
    num_layers: the number of layers, ``I + 1``.
    total_steps: the number of steps training will run, ``T``.
    t_0: ``r_0``, the first layer's freeze time before spacing, in
      ``(0, 1]``; ``t_0 = 1`` freezes no layer before the end (every layer
      then follows one cosine annealing over the whole run).
    spacing: ``'linear'``, ``'squared'`` or ``'cubic'``.
    scaled: start layer ``i`` at ``alpha / t_i`` instead of ``alpha``.

  Example:
    Three layers over 100 steps, linear spacing from ``t_0 = 0.5``:

    >>> import multirate_optax as mo
    >>> timetable = mo.FreezeOutTimetable(num_layers=3, total_steps=100, t_0=0.5,
    ...                                   spacing='linear')
    >>> timetable.freeze_fractions, timetable.freeze_steps
    ((0.5, 0.75, 1.0), (50, 75, 100))
    >>> [sorted(layers) for layers in timetable.phases]
    [['0', '1', '2'], ['1', '2'], ['2'], []]
    >>> [timetable.phase(t) for t in (0, 49, 50, 75, 99, 100)]
    [0, 0, 1, 2, 2, 3]
    >>> [timetable.learning_rate_factor(0, t) for t in (0, 25, 50)]  # 1 / t_0, cosine
    [2.0, 1.0, 0.0]
  """

  num_layers: int
  total_steps: int
  t_0: float = 0.8
  spacing: Spacing = "cubic"
  scaled: bool = True

  def __post_init__(self):
    object.__setattr__(self, "num_layers",
                       whole_number(self.num_layers, "num_layers"))
    object.__setattr__(self, "total_steps",
                       whole_number(self.total_steps, "total_steps"))
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


def _covering(layers: Labels, tree: PyTree, what: str) -> PyTree:
  """``layers`` for ``tree``: a ``{module: label}`` mapping covers any tree of
  some of those modules, e.g. the batch statistics, which only normalising
  modules have."""
  label_tree = layers(tree) if callable(layers) else layers
  if isinstance(label_tree, Mapping) and isinstance(tree, Mapping):
    missing = [name for name in tree if name not in label_tree]
    if missing:
      raise ValueError(
          f"{what} has top-level entries {missing} that layers does not "
          f"label; layers has {list(label_tree)}.")
    label_tree = {name: label_tree[name] for name in tree}
  return label_tree


def _resolve_layers(layers: Labels, tree: PyTree, num_layers: int,
                    what: str) -> tuple[int, ...]:
  """The layer index of every leaf of ``tree``."""
  label_tree = _covering(layers, tree, what)
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


def freezeout(
    optimizer: optax.GradientTransformation,
    timetable: FreezeOutTimetable,
    *,
    layers: Labels,
) -> optax.GradientTransformationExtraArgs:
  """FreezeOut: layer-wise cosine learning rates, freezing layers in order.

  Each layer has its own copy of ``optimizer`` (its own momentum, say), whose
  updates are multiplied by the layer's ``timetable.learning_rate_factor`` at
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
    timetable: the :class:`FreezeOutTimetable`, with the number of steps
      training will really run.
    layers: the layer index (``0 .. timetable.num_layers - 1``, from the input)
      of each parameter, as a pytree with the parameters' structure or a
      prefix of it (``{'conv': 0, 'block': 1, 'head': 2}``), or a callable
      returning one such as :func:`layers_by_module`. Every layer must have at
      least one parameter.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`TimetableState` with ``timetable``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'conv': jnp.ones(2), 'head': jnp.ones(2)}
    >>> timetable = mo.FreezeOutTimetable(num_layers=2, total_steps=10, t_0=0.5,
    ...                                 spacing='linear')
    >>> timetable.freeze_steps
    (5, 10)
    >>> tx = mo.freezeout(optax.sgd(0.1), timetable, layers=mo.layers_by_module)
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
  if not isinstance(timetable, FreezeOutTimetable):
    raise TypeError(
        "timetable must be a FreezeOutTimetable, got "
        f"{type(timetable).__name__}.")
  names = tuple(str(i) for i in range(timetable.num_layers))

  def labels(params) -> tuple[str, ...]:
    per_leaf = _resolve_layers(layers, params, timetable.num_layers, "params")
    empty = sorted(set(range(timetable.num_layers)) - set(per_leaf))
    if empty:
      raise ValueError(
          f"layers {empty} have no parameters; the timetable has "
          f"{timetable.num_layers} layers, numbered 0 to "
          f"{timetable.num_layers - 1}, and each needs at least one.")
    return tuple(names[i] for i in per_leaf)

  def groups(count, active):
    if count is None:
      return {name: gated(optimizer, None) for name in names}
    return {name: gated(optimizer,
                        name in active if active is not None else
                        jnp.logical_not(timetable.is_frozen(i, count)),
                        scale=timetable.learning_rate_factor(i, count))
            for i, name in enumerate(names)}

  return timetabled(timetable, labels=labels, groups=groups)


def keep_frozen(
    new: PyTree,
    old: PyTree,
    timetable: Timetable,
    *,
    layers: Labels,
    step: Step,
) -> PyTree:
  """``new``, with the leaves of groups inactive at ``step`` taken from ``old``.

  Use it on batch-norm statistics, so that those of frozen layers stop
  updating, as in the reference implementation of FreezeOut (which also
  switches the frozen layers' batch norm to its running averages in the
  forward pass; here the model decides how it normalises). It works for any
  timetable: with :func:`multirate_optax.gradual_unfreezing` it keeps the
  statistics of the groups not yet unfrozen.

  Args:
    new: the values the train step at ``step`` produced (e.g. ``batch_stats``).
    old: the values before that step, with the structure of ``new``.
    timetable: the timetable given to :func:`freezeout` (or to another
      timetabled transformation).
    layers: the layer index of each leaf of ``new``, as for :func:`freezeout`
      (the ``{module: layer}`` mapping given there works as it is); for
      another timetable, the group name of each leaf, as a pytree with the
      structure of ``new`` (or a prefix of it), a ``{module: group}``
      mapping, or a callable.
    step: the index of the train step (from 0) that produced ``new``. With a
      Python int the choice is made on the host and no device work is done.

  Returns:
    A tree with the structure of ``new``.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> timetable = mo.FreezeOutTimetable(num_layers=2, total_steps=10, t_0=0.5)
    >>> layers = {'bn': 0, 'head': 1}
    >>> old = {'bn': {'mean': jnp.zeros(2)}}
    >>> new = {'bn': {'mean': jnp.ones(2)}}
    >>> mo.keep_frozen(new, old, timetable, layers=layers, step=2)['bn']['mean']
    Array([0., 0.], dtype=float32)
  """
  if isinstance(timetable, FreezeOutTimetable):
    per_leaf = tuple(str(layer) for layer in _resolve_layers(
        layers, new, timetable.num_layers, "new"))
  elif isinstance(timetable, Timetable):
    per_leaf = _resolve_groups(layers, new, timetable.groups)
  else:
    raise TypeError(
        f"timetable must be a Timetable, got {type(timetable).__name__}.")
  new_leaves, treedef = jax.tree.flatten(new)
  old_leaves = jax.tree.leaves(old)
  if len(old_leaves) != len(new_leaves):
    raise ValueError(
        f"old has {len(old_leaves)} leaves and new {len(new_leaves)}; they "
        "need the same structure.")
  phases = timetable.phases
  if isinstance(step, (int, np.integer)):
    active = phases[timetable.phase(int(step))]
    kept = [n if group in active else o
            for n, o, group in zip(new_leaves, old_leaves, per_leaf)]
  else:
    phase = timetable.phase(step)
    is_active = {group: jnp.asarray([group in p for p in phases])[phase]
                 for group in set(per_leaf)}
    kept = [jnp.where(is_active[group], n, o)
            for n, o, group in zip(new_leaves, old_leaves, per_leaf)]
  return jax.tree.unflatten(treedef, kept)


def _resolve_groups(groups: Labels, tree: PyTree,
                    names: frozenset[str]) -> tuple[str, ...]:
  """The group of every leaf of ``tree``; a ``{module: group}`` mapping may
  name more modules than ``tree`` has (batch statistics are in a few)."""
  return resolve_labels(_covering(groups, tree, "new"), tree, names)
