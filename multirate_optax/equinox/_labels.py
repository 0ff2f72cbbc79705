"""Labels of an Equinox model's parameters: by a ``where`` function or a filter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from multirate_optax.core._checks import not_a_step_count
from multirate_optax.core._groups import FAST, SLOW, leaf_paths

PyTree = Any


def _labelled(params: PyTree, fast_spec: PyTree, what: str) -> PyTree:
  """``'fast'`` where the filter ``fast_spec`` selects a leaf, else ``'slow'``."""
  selected = eqx.filter(params, fast_spec)
  # None marks both the parameters' static slots (params is a filtered model)
  # and the leaves the filter leaves out; the first stay None in the labels.
  labels = jax.tree.map(
      lambda leaf, chosen: None if leaf is None else
      FAST if chosen is not None else SLOW,
      params, selected, is_leaf=lambda x: x is None)
  if FAST not in jax.tree.leaves(labels):
    paths = leaf_paths(params)
    raise ValueError(
        f"{what} selects none of the {len(paths)} parameters; their paths: "
        f"{paths[:8]}" + (" ..." if len(paths) > 8 else "") + ".")
  return labels


def fast_by_where(
    where: Callable[[PyTree], Any]) -> Callable[[PyTree], PyTree]:
  """Labels the parameters inside ``where(model)`` ``'fast'``, the rest ``'slow'``.

  ``where`` names parts of the model as ``eqx.tree_at`` does:
  ``lambda m: m.head``, or several, ``lambda m: (m.head, m.norm.weight)``.

  Args:
    where: a function from the model (or its parameters) to the submodules or
      leaves that are fast.

  Returns:
    A labels function for :func:`multirate_optax.multirate`, applied by its
    ``init`` to ``eqx.filter(model, eqx.is_inexact_array)``.

  Raises:
    ValueError: when applied, if ``where`` selects no parameter.

  Example:
    >>> import equinox as eqx, jax
    >>> import multirate_optax as mo
    >>> class Net(eqx.Module):
    ...   body: eqx.nn.Linear
    ...   head: eqx.nn.Linear
    ...   def __init__(self, key):
    ...     k1, k2 = jax.random.split(key)
    ...     self.body = eqx.nn.Linear(3, 8, key=k1)
    ...     self.head = eqx.nn.Linear(8, 2, key=k2)
    >>> params = eqx.filter(Net(jax.random.key(0)), eqx.is_inexact_array)
    >>> labels = mo.equinox.fast_by_where(lambda m: m.head)(params)
    >>> labels.body.weight, labels.head.weight, labels.head.bias
    ('slow', 'fast', 'fast')
  """
  if not callable(where):
    raise TypeError(f"where must be a function of the model, got {where!r}.")

  def labels(params: PyTree) -> PyTree:
    not_a_step_count(params, "the labels function of fast_by_where")
    unselected = jax.tree.map(lambda _: False, params)
    try:
      spec = eqx.tree_at(where, unselected,
                         replace_fn=lambda part: jax.tree.map(
                             lambda _: True, part))
    except (AttributeError, TypeError, ValueError) as e:
      raise ValueError(
          f"the fast part's where function {where!r} cannot be applied to "
          f"the parameters (a {type(params).__name__}): {e}. It must return "
          "parts of the model, as for eqx.tree_at.") from e
    return _labelled(params, spec, f"the fast part's where function {where!r}")

  return labels


def fast_by_filter(filter_spec: PyTree) -> Callable[[PyTree], PyTree]:
  """Labels the parameters that an Equinox filter selects ``'fast'``, the rest ``'slow'``.

  Args:
    filter_spec: a filter as for ``eqx.filter``: a function of each leaf
      (``lambda x: x.ndim == 1`` for the biases and norms), or a pytree of
      bools and such functions with the model's structure or a prefix of it.

  Returns:
    A labels function for :func:`multirate_optax.multirate`.

  Raises:
    ValueError: when applied, if the filter selects no parameter.

  Example:
    >>> import equinox as eqx, jax
    >>> import multirate_optax as mo
    >>> model = eqx.nn.MLP(3, 2, width_size=8, depth=1, key=jax.random.key(0))
    >>> params = eqx.filter(model, eqx.is_inexact_array)
    >>> labels = mo.equinox.fast_by_filter(lambda x: x.ndim == 1)(params)
    >>> [(layer.weight, layer.bias) for layer in labels.layers]
    [('slow', 'fast'), ('slow', 'fast')]
  """

  def labels(params: PyTree) -> PyTree:
    not_a_step_count(params, "the labels function of fast_by_filter")
    return _labelled(params, filter_spec, f"the fast filter {filter_spec!r}")

  return labels
