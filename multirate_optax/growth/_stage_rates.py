"""Learning rates per growth stage: each stage's weights at their own rate.

Weights added at different stages of a growing network have trained for
different lengths of time. Yuan, Savarese & Maire (NeurIPS 2023) rebalance
them by giving the weights ``W_dt`` added at stage ``t`` the rate
``eta_t = eta_0 * ||W_dt||_F / ||W_0||_F`` on top of the base schedule, with
``W_0`` the weights of the network before growth. Whether the norms are taken
per layer or over the whole network is not confirmed; both are offered here.
In our ablation (``benchmarks/growing.py``: a ResNet-style CNN grown on the
digits, three seeds) the two scopes could not be told apart, nor either from
no adaptation; ``'layer'`` is the default.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Scope = Literal["layer", "network"]


def stage_norm_factors(params: PyTree, stages: PyTree,
                       scope: Scope = "layer") -> PyTree:
  """``||W_dt|| / ||W_0||`` for every element, from its stage ``t``.

  Args:
    params: the parameters.
    stages: the stage of every element (:func:`element_stages`).
    scope: ``'layer'``: norms within each parameter leaf; ``'network'``:
      norms over all leaves together.

  Returns:
    A tree like ``params`` of factors: 1 for stage-0 elements, and 1 where
    ``W_0`` has no element (or a zero norm) in the scope.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import multirate_optax as mo
    >>> params = {'a': jnp.array([3.0, 4.0, 1.0, 1.0]), 'b': jnp.array([1.0, 2.0])}
    >>> stages = {'a': np.array([0, 0, 1, 1]), 'b': np.array([0, 0])}
    >>> factors = mo.stage_norm_factors(params, stages)  # sqrt(2) / 5 for stage 1
    >>> [round(float(f), 4) for f in factors['a']], factors['b'].tolist()
    ([1.0, 1.0, 0.2828, 0.2828], [1.0, 1.0])
    >>> net = mo.stage_norm_factors(params, stages, scope='network')
    >>> round(float(net['a'][2]), 4)  # sqrt(2) / sqrt(9 + 16 + 1 + 4)
    0.2582
  """
  if scope not in ("layer", "network"):
    raise ValueError(f"scope must be 'layer' or 'network', got {scope!r}.")
  num_stages = 1 + max(int(np.max(s)) if np.size(s) else 0
                       for s in jax.tree.leaves(stages))

  def squared_norms(p, s):
    return jax.ops.segment_sum(jnp.ravel(jnp.square(p.astype(jnp.float32))),
                               jnp.ravel(jnp.asarray(s)), num_stages)

  def factors(norms):
    norms = jnp.sqrt(norms)
    safe = jnp.where(norms[0] > 0, norms[0], 1.0)
    return jnp.where(norms[0] > 0, norms / safe, 1.0).at[0].set(1.0)

  per_leaf = jax.tree.map(squared_norms, params, stages)
  if scope == "network":
    total = factors(sum(jax.tree.leaves(per_leaf)))
    return jax.tree.map(lambda s: total[jnp.asarray(s)], stages)
  return jax.tree.map(lambda n, s: factors(n)[jnp.asarray(s)], per_leaf, stages)


def scale_by_stage_norms(stages: PyTree,
                         scope: Scope = "layer") -> optax.GradientTransformation:
  """Scales each update element by its stage's ``||W_dt|| / ||W_0||``.

  Chain it after the optimizer (whose learning rate is ``eta_0``): the
  factors are computed from the current ``params`` on every update.

  Args:
    stages: the stage of every parameter element, from
      :func:`element_stages`; fixed for the stage of training it is built for
      (rebuild it, and the train step, at each growth).
    scope: ``'layer'`` or ``'network'``, see :func:`stage_norm_factors`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> import multirate_optax as mo
    >>> params = {'w': jnp.array([3.0, 4.0, 1.0, 1.0])}
    >>> stages = {'w': np.array([0, 0, 1, 1])}
    >>> tx = mo.scale_by_stage_norms(stages)
    >>> updates, _ = tx.update({'w': jnp.ones(4)}, tx.init(params), params)
    >>> [round(float(u), 4) for u in updates['w']]  # sqrt(2) / 5 for stage 1
    [1.0, 1.0, 0.2828, 0.2828]
  """
  if scope not in ("layer", "network"):
    raise ValueError(f"scope must be 'layer' or 'network', got {scope!r}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_stage_norms needs params in update.")
    factors = stage_norm_factors(params, stages, scope)
    return jax.tree.map(lambda u, f: (u * f).astype(u.dtype), updates,
                        factors), state

  return optax.GradientTransformation(init_fn, update_fn)
