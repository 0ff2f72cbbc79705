"""Layer-wise learning-rate decay: each leaf's updates times ``decay ** depth``.

The usual recipe for fine-tuning deep pretrained networks (BEiT, ELECTRA,
ULMFiT's discriminative rates): the head (depth 0) moves with the full rate,
each layer below with ``decay`` times the rate of the one above. It is a
stateless transformation on updates, so it composes with any optimizer and
with the timetabled ones: chained after the optimizer (``optax.chain(optax.
adam(lr), layerwise_decay(...))``), inside a group's optimizer, or after a
whole :func:`~multirate_optax.multirate`. It saves no compute by itself: a
layer with a small rate still costs its full backward pass; a timetable that
leaves layers inactive is what saves it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import numpy as np
import optax

from multirate_optax.core._checks import not_a_step_count, real_number
from multirate_optax.core._groups import (
    leaf_paths, structure_mismatch, path_str)

PyTree = Any
Depths = Union[PyTree, Callable[[PyTree], PyTree]]


def _is_depth(value: Any) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= 0)


def _resolve_depths(depths: Depths, tree: PyTree) -> tuple[int, ...]:
  """The depth of every leaf of ``tree``, checked, in ``jax.tree.leaves`` order."""
  depth_tree = depths(tree) if callable(depths) else depths
  try:
    per_leaf = jax.tree.leaves(jax.tree.broadcast(depth_tree, tree))
  except (ValueError, TypeError) as e:
    raise ValueError(structure_mismatch(depth_tree, tree, "depths", "depths")) from e
  if len(per_leaf) != len(jax.tree.leaves(tree)):
    raise ValueError(structure_mismatch(depth_tree, tree, "depths", "depths"))
  for path, depth in zip(leaf_paths(tree), per_leaf):
    if not _is_depth(depth):
      raise ValueError(
          f"parameter {path!r} has depth {depth!r}; a depth is an int >= 0 "
          "(0 for the head, counting layers down from it).")
  return tuple(int(depth) for depth in per_leaf)


def layerwise_decay(
    decay: Union[float, jax.Array],
    *,
    depths: Depths,
) -> optax.GradientTransformation:
  """Scales the updates of each leaf by ``decay ** depth``.

  Args:
    decay: the factor per layer of depth, in ``(0, 1]`` (0.65 to 0.9 in
      ViT/BERT fine-tuning recipes; ULMFiT's discriminative rates are
      ``1 / 2.6``). A scalar array is accepted (e.g. from
      ``optax.inject_hyperparams``).
    depths: the depth of each parameter, an int ``>= 0`` (0 for the head), as
      a pytree with the parameters' structure or a prefix of it
      (``{'embed': 3, 'block0': 2, 'block1': 1, 'head': 0}``), or a callable
      returning one, such as :func:`depths_by_module` or
      :func:`depths_by_path`. Read once per tree structure, at ``init``.

  Returns:
    A stateless :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones(2), 'head': jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  mo.layerwise_decay(0.5, depths={'body': 1, 'head': 0}))
    >>> grads = {'body': jnp.ones(2), 'head': jnp.ones(2)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> round(float(updates['body'][0]), 6), round(float(updates['head'][0]), 6)
    (-0.05, -0.1)
  """
  decay = real_number(decay, "decay")
  if not isinstance(decay, (jax.Array, np.ndarray)) and not 0 < decay <= 1:
    raise ValueError(
        f"decay must be in (0, 1] (each layer down moves decay times the "
        f"rate of the one above), got {decay!r}.")
  # As for the labels of a timetable: depths read off a mapping's order
  # (depths_by_module) must not change on parameters whose keys a JAX
  # transformation has sorted, so they are kept by tree structure.
  resolved: dict[Any, tuple[int, ...]] = {}

  def depths_of(tree: PyTree) -> tuple[int, ...]:
    treedef = jax.tree.structure(tree)
    if treedef not in resolved:
      resolved[treedef] = _resolve_depths(depths, tree)
    return resolved[treedef]

  def init_fn(params):
    depths_of(params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    per_leaf = depths_of(updates if params is None else params)
    leaves, treedef = jax.tree.flatten(updates)
    scaled = [u if depth == 0 else (u * decay ** depth).astype(u.dtype)
              for u, depth in zip(leaves, per_leaf)]
    return jax.tree.unflatten(treedef, scaled), state

  return optax.GradientTransformation(init_fn, update_fn)


def depths_by_module(params: Mapping[str, Any]) -> dict[str, int]:
  """Depths of the top-level modules of Flax parameters: the last one 0.

  Counts down the insertion order of the top-level mapping, which for Flax
  parameters is the order in which the modules were created (the head last).
  Edit the result to give several modules one depth.

  Args:
    params: parameters whose top level maps module names to their parameters.

  Returns:
    ``{module name: depth}``, usable as ``depths`` of :func:`layerwise_decay`.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> mo.depths_by_module({'Conv_0': jnp.ones(1), 'Conv_1': jnp.ones(1),
    ...                      'Dense_0': jnp.ones(1)})
    {'Conv_0': 2, 'Conv_1': 1, 'Dense_0': 0}
  """
  not_a_step_count(params, "depths_by_module")
  if not isinstance(params, Mapping):
    raise TypeError(
        "depths_by_module needs parameters whose top level is a mapping of "
        f"module names, got {type(params).__name__}.")
  last = len(params) - 1
  return {name: last - index for index, name in enumerate(params)}


def depths_by_path(depth_of: Callable[[str], int]) -> Callable[[PyTree], PyTree]:
  """Depths from each leaf's '/'-joined path.

  Args:
    depth_of: the depth of a leaf given its path, e.g. for a 12-layer
      encoder ``lambda path: 0 if path.startswith('head') else 12 - layer``.

  Returns:
    A ``depths`` function for :func:`layerwise_decay`.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> params = {'layer_0': {'w': jnp.ones(1)}, 'layer_1': {'w': jnp.ones(1)},
    ...           'head': {'w': jnp.ones(1)}}
    >>> depth = lambda path: 0 if path.startswith('head') else 2 - int(path[6])
    >>> mo.depths_by_path(depth)(params)
    {'head': {'w': 0}, 'layer_0': {'w': 2}, 'layer_1': {'w': 1}}
  """
  def depths(params: PyTree) -> PyTree:
    not_a_step_count(params, "the depths function of depths_by_path")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: depth_of(path_str(path)), params)

  return depths
