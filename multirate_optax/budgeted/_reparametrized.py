"""Reparametrized layers: W_l = W0_l + g_l * dW_l, and the merge back to W.

A *layer* is one weight leaf of a parameter tree, named by its path as
:func:`multirate_optax.path_str` spells it (``'params/Conv_0/kernel'``). The
pretrained weights ``W0`` stay as they are; each adapted layer gets a learned
change ``dW_l`` (initialised to zero, so training starts from the pretrained
model) and a scalar gate ``g_l``. :func:`merge` folds hard 0/1 gates into the
weights, so the adapted model is a plain parameter tree of the original
architecture: same structure, shapes and dtypes, hence the same compiled
program and inference cost.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from multirate_optax.core._groups import path_str

PyTree = Any
Deltas = dict[str, jax.Array]
Gates = Mapping[str, Union[float, jax.Array]]
Patterns = Union[None, str, Iterable[str]]


def leaves_by_path(params: PyTree) -> dict[str, Any]:
  """Every leaf of ``params`` by its path string, in ``jax.tree.leaves`` order."""
  return {path_str(path): leaf for path, leaf
          in jax.tree_util.tree_flatten_with_path(params)[0]}


def unknown_layer_error(layer: str, available: Collection[str],
                        where: str) -> ValueError:
  """A ValueError naming ``layer`` and listing the paths that ``where`` has."""
  available = list(available)
  close = difflib.get_close_matches(layer, available, n=3)
  shown = available[:20]
  more = f" ... ({len(available)} in all)" if len(available) > 20 else ""
  hint = f" Did you mean {close}?" if close else ""
  return ValueError(
      f"layer {layer!r} is not in {where}.{hint} Available paths: "
      f"{shown}{more}.")


def check_same_layers(wanted: Iterable[str], given: Iterable[str],
                      summary: str, missing_label: str,
                      extra_label: str) -> None:
  """Refuses ``given`` unless it names exactly the layers of ``wanted``."""
  wanted, given = list(wanted), list(given)
  missing = [layer for layer in wanted if layer not in given]
  extra = [layer for layer in given if layer not in wanted]
  if missing or extra:
    raise ValueError(
        f"{summary}: " + "; ".join(part for part in (
            f"{missing_label}: {missing}" if missing else "",
            f"{extra_label}: {extra}" if extra else "") if part) + ".")


def check_layers_in(layers: Iterable[str], available: Mapping[str, Any],
                    where: str) -> None:
  """Refuses a layer that is not a path string of ``available``, naming it."""
  for layer in layers:
    if not isinstance(layer, str):
      raise TypeError(
          f"layers are path strings such as 'params/Dense_0/kernel', got "
          f"{layer!r} of type {type(layer).__name__}.")
    if layer not in available:
      raise unknown_layer_error(layer, available, where)


def _patterns(patterns: Patterns) -> list[re.Pattern[str]]:
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = [patterns]
  return [re.compile(p) for p in patterns]


def candidate_layers(
    params: PyTree,
    include: Patterns = None,
    exclude: Patterns = None,
) -> tuple[str, ...]:
  """The weight leaves that can be adapted: every leaf with ``ndim >= 2``.

  Conv and dense kernels and embeddings qualify; biases and normalisation
  scales do not.

  Args:
    params: the pretrained parameters.
    include: regular expressions (or one) searched for in each path; when
      given, only paths matching at least one of them are kept.
    exclude: regular expressions; paths matching any of them are dropped.

  Returns:
    The layers' paths, in ``jax.tree.leaves`` order.

  Raises:
    ValueError: if an ``include`` pattern matches no weight leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.ones(4)},
    ...           'head': {'kernel': jnp.ones((4, 2))}}
    >>> budgeted.candidate_layers(params)
    ('conv/kernel', 'head/kernel')
    >>> budgeted.candidate_layers(params, exclude='^head/')
    ('conv/kernel',)
  """
  weights = [path for path, leaf in leaves_by_path(params).items()
             if np.ndim(leaf) >= 2]
  included, excluded = _patterns(include), _patterns(exclude)
  for pattern in included:
    if not any(pattern.search(path) for path in weights):
      raise ValueError(
          f"include pattern {pattern.pattern!r} matches no weight leaf "
          f"(ndim >= 2) of the parameters; their paths are {weights}.")
  return tuple(
      path for path in weights
      if (not included or any(p.search(path) for p in included))
      and not any(p.search(path) for p in excluded))


def layer_sizes(params: PyTree, layers: Iterable[str]) -> dict[str, int]:
  """The number of parameters of each layer, in the order of ``layers``.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'kernel': jnp.ones((4, 2))}}
    >>> budgeted.layer_sizes(params, ['a/kernel', 'b/kernel'])
    {'a/kernel': 12, 'b/kernel': 8}
  """
  leaves = leaves_by_path(params)
  layers = list(layers)
  check_layers_in(layers, leaves, "the parameters")
  return {layer: int(np.size(leaves[layer])) for layer in layers}


def init_deltas(params: PyTree, layers: Iterable[str]) -> Deltas:
  """Zero changes ``dW_l``, shaped and typed like each layer's weight.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> params = {'dense': {'kernel': jnp.ones((2, 3))}}
    >>> budgeted.init_deltas(params, ['dense/kernel'])['dense/kernel'].shape
    (2, 3)
  """
  leaves = leaves_by_path(params)
  layers = list(layers)
  check_layers_in(layers, leaves, "the parameters")
  return {layer: jnp.zeros(np.shape(leaves[layer]), leaves[layer].dtype)
          for layer in layers}


def _changed(params: PyTree, deltas: Mapping[str, jax.Array],
             gate_of: Mapping[str, Any]) -> PyTree:
  """``params`` with ``W0 + g * dW`` for every layer in ``gate_of``."""
  leaves = leaves_by_path(params)
  check_layers_in(deltas, leaves, "the parameters")
  for layer, delta in deltas.items():
    if np.shape(delta) != np.shape(leaves[layer]):
      raise ValueError(
          f"the change of layer {layer!r} has shape {np.shape(delta)}, but "
          f"its weight has shape {np.shape(leaves[layer])}; make the changes "
          "with init_deltas of these parameters.")

  def change(path, weight):
    layer = path_str(path)
    if layer not in gate_of:
      return weight
    gate = gate_of[layer]
    delta = deltas[layer]
    moved = delta if gate is None else jnp.asarray(gate, delta.dtype) * delta
    return (weight + moved).astype(weight.dtype)

  return jax.tree_util.tree_map_with_path(change, params)


def apply_deltas(params: PyTree, deltas: Mapping[str, jax.Array],
                 gates: Gates) -> PyTree:
  """The parameters with ``W_l = W0_l + g_l * dW_l`` for each layer in ``deltas``.

  Differentiable in ``deltas`` and ``gates``; layers without a change keep
  their weights. Each result keeps its weight's dtype.

  Args:
    params: the pretrained parameters ``W0``.
    deltas: ``{layer: dW_l}``, e.g. from :func:`init_deltas`.
    gates: ``{layer: g_l}``, one scalar per layer of ``deltas`` (the same
      keys), e.g. from :func:`threshold_gates` or :func:`sample_gates`.

  Returns:
    A tree with the structure, shapes and dtypes of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> params = {'dense': {'kernel': jnp.ones((1, 2))}}
    >>> deltas = {'dense/kernel': jnp.full((1, 2), 2.0)}
    >>> budgeted.apply_deltas(params, deltas, {'dense/kernel': 0.5})
    {'dense': {'kernel': Array([[2., 2.]], dtype=float32)}}
  """
  check_same_layers(deltas, gates, "gates need exactly the layers of deltas",
                    "layers without a gate",
                    "gates of layers that have no change")
  for layer, gate in gates.items():
    if np.ndim(gate) != 0:
      raise ValueError(
          f"the gate of layer {layer!r} must be a scalar, got shape "
          f"{np.shape(gate)}.")
  return _changed(params, deltas, gates)


def merge(params: PyTree, deltas: Mapping[str, jax.Array],
          selection: Iterable[str]) -> PyTree:
  """Plain weights of the adapted model: ``W0 + dW`` on ``selection``, ``W0`` elsewhere.

  The same as :func:`apply_deltas` with gates 1 on ``selection`` and 0 on the
  other layers, folded into the weights: the result has the structure,
  shapes and dtypes of ``params``, so the model runs exactly as before.

  Args:
    params: the pretrained parameters ``W0``.
    deltas: ``{layer: dW_l}``; it may hold only the selected layers.
    selection: the layers whose change is kept.

  Returns:
    A tree with the structure, shapes and dtypes of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> params = {'a': jnp.zeros((1, 2)), 'b': jnp.zeros((1, 2))}
    >>> deltas = {'a': jnp.ones((1, 2)), 'b': jnp.ones((1, 2))}
    >>> merged = budgeted.merge(params, deltas, ['b'])
    >>> merged['a'].tolist(), merged['b'].tolist()
    ([[0.0, 0.0]], [[1.0, 1.0]])
  """
  selection = list(selection)
  check_layers_in(selection, deltas, "the changes (deltas)")
  return _changed(params, {layer: deltas[layer] for layer in selection},
                  dict.fromkeys(selection))

