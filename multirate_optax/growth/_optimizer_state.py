"""The optimizer state of a network that grew: old entries kept, new ones zero."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np

from multirate_optax.core._groups import leaf_paths

PyTree = Any


def grow_optimizer_state(
    optimizer: Any,
    opt_state: PyTree,
    params: PyTree,
    factors: Optional[PyTree] = None,
    *,
    reset: bool = False,
) -> PyTree:
  """The optimizer state for grown parameters, carrying the old one over.

  ``optimizer.init(params)`` gives the new state's structure; every leaf whose
  shape did not change is taken from ``opt_state`` as it is (step counts,
  states of parameters that did not grow); every leaf that grew holds the old
  leaf in its leading corner (old units keep their indices) and zeros for the
  new units. Works for any optax optimizer whose state holds
  parameter-shaped leaves, multirate's included.

  Where :func:`grow` rescaled a weight by ``c`` (variance transfer), the
  state follows the change of coordinates ``w -> c w``, under which gradients
  become ``g / c``: first moments (momentum traces, Adam's ``mu``) are
  multiplied by ``1 / c`` and second moments (fields named ``nu``) by
  ``1 / c**2``.

  Args:
    optimizer: the optimizer (anything with ``init``), built for the grown
      parameters.
    opt_state: its state before growth.
    params: the grown parameters.
    factors: the factors :func:`grow` returned; ``None`` means no rescaling.
    reset: start every parameter-shaped leaf afresh from ``optimizer.init``
      (the common practice, kept as a baseline), carrying over only the
      other leaves, such as step counts, so that learning-rate schedules go
      on from the global step.

  Returns:
    The state for ``params``.

  Example:
    The momentum of a hidden layer grown from 3 to 5 units: the old units'
    traces carried over, zeros for the new ones.

    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> layers = [mo.Layer('hidden/kernel', reads='input', writes='hidden'),
    ...           mo.Layer('out/kernel', reads='hidden', writes='output')]
    >>> params = {'hidden': {'kernel': jnp.ones((2, 3))}, 'out': {'kernel': jnp.ones((3, 1))}}
    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params),
    ...                          tx.init(params), params)
    >>> grown, _, _, factors = mo.grow(
    ...     params, {}, layers, mo.describe_widths(layers, params), {'hidden': 5},
    ...     key=jax.random.key(0))
    >>> opt_state = mo.grow_optimizer_state(tx, opt_state, grown, factors)
    >>> opt_state[0].trace['out']['kernel'].ravel().tolist()
    [1.0, 1.0, 1.0, 0.0, 0.0]
  """
  new_state = optimizer.init(params)
  new_leaves, treedef = jax.tree_util.tree_flatten_with_path(new_state)
  old_leaves = jax.tree.leaves(opt_state)
  if len(old_leaves) != len(new_leaves):
    raise ValueError(
        f"the optimizer's state for the grown parameters has "
        f"{len(new_leaves)} leaves but the state given has {len(old_leaves)}: "
        "pass the state of the same optimizer.")
  factor_of = {tuple(p.split("/")): 1.0 for p in leaf_paths(params)}
  if factors is not None:
    factor_of.update({tuple(p.split("/")): f for p, f in
                      zip(leaf_paths(factors), jax.tree.leaves(factors))})
  leaves = []
  for (path, new), old in zip(new_leaves, old_leaves):
    factor = _state_factor(path, factor_of)
    if reset and factor is not None:
      leaves.append(new)
      continue
    factor = 1.0 if factor is None else factor
    if np.shape(new) == np.shape(old) and factor == 1.0:
      leaves.append(old)
      continue
    if np.ndim(new) != np.ndim(old) or any(
        n < o for n, o in zip(np.shape(new), np.shape(old))):
      raise ValueError(
          f"optimizer state leaf {jax.tree_util.keystr(path)} has shape "
          f"{np.shape(old)}, which does not fit into the grown shape "
          f"{np.shape(new)}.")
    grown = np.zeros(np.shape(new), new.dtype)  # on the host: see grow
    grown[tuple(slice(0, n) for n in np.shape(old))] = np.asarray(old) * factor
    leaves.append(jax.numpy.asarray(grown))
  return jax.tree.unflatten(jax.tree.structure(new_state), leaves)


def _state_factor(path, factor_of: Mapping[tuple[str, ...], float]
                  ) -> Optional[float]:
  """The factor on a state leaf: its parameter's, as a first or second moment.

  ``None`` for a leaf that is not parameter-shaped (no parameter's path ends
  its path), such as a step count.
  """
  names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                for k in path)
  for length in range(len(names), 0, -1):
    factor = factor_of.get(names[-length:])
    if factor is not None:
      break
  else:
    return None
  power = 2 if "nu" in names[:len(names) - length] else 1
  return float(factor) ** -power
