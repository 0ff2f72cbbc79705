"""SWR stage 2: a small policy that gives each layer a gate probability under a budget.

After stage 1 has trained every layer's change ``dW_l``, the policy reads a
few features of each layer (:func:`layer_features`) and the budget as a
fraction of the candidates' parameters, and outputs the probability ``p_l``
that layer ``l`` is adapted. It is trained on the task loss with gates drawn
by :func:`sample_gates`, plus :func:`budget_penalty` on the expected number
of changed parameters; the final choice is then
:func:`select_within_budget` on the probabilities.

The gates are drawn by :func:`sample_gates`, a straight-through Bernoulli
estimator; its docstring says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multirate_optax.core._checks import real_number, whole_number
from multirate_optax.budgeted._reparametrized import leaves_by_path, unknown_layer_error

PyTree = Any

FEATURE_NAMES = ("log_size", "size_share", "depth", "change")
"""The columns of :func:`layer_features`, in order.

Example:
  >>> import jax.numpy as jnp
  >>> from multirate_optax import budgeted
  >>> params = {'body': {'kernel': jnp.ones((2, 2))}, 'head': {'kernel': jnp.ones((2, 1))}}
  >>> layers = budgeted.candidate_layers(params)
  >>> features = budgeted.layer_features(
  ...     params, budgeted.init_deltas(params, layers), layers)
  >>> {name: round(float(value), 3)  # the head's row
  ...  for name, value in zip(budgeted.FEATURE_NAMES, features[1])}
  {'log_size': 0.683, 'size_share': 0.333, 'depth': 1.0, 'change': 0.0}
"""


def layer_features(params: PyTree, deltas: Mapping[str, jax.Array],
                   layers: Iterable[str]) -> jax.Array:
  """Per-layer features for the policy, one row per layer.

  The columns (:data:`FEATURE_NAMES`), each in ``[0, 1]``:

  * ``log_size``: ``log(1 + n_l) / log(1 + max_l n_l)``, ``n_l`` the layer's
    number of parameters;
  * ``size_share``: ``n_l / sum_l n_l``, the share of the budget it would use;
  * ``depth``: the layer's position in ``layers``, 0 for the first and 1 for
    the last (pass them in network order, as :func:`candidate_layers` does);
  * ``change``: ``||dW_l|| / ||W0_l||`` after stage 1, divided by its largest
    value over the layers (0 everywhere if no layer has changed): how much
    the layer wanted to move.

  Args:
    params: the pretrained parameters ``W0``.
    deltas: ``{layer: dW_l}`` after stage 1.
    layers: the layers, in network order.

  Returns:
    A float32 array of shape ``[len(layers), 4]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> params = {'a': jnp.ones((2, 2)), 'b': jnp.ones((2, 6))}
    >>> deltas = {'a': jnp.ones((2, 2)), 'b': jnp.zeros((2, 6))}
    >>> features = budgeted.layer_features(params, deltas, ['a', 'b'])
    >>> [[round(float(v), 3) for v in row] for row in features]
    [[0.627, 0.25, 0.0, 1.0], [1.0, 0.75, 1.0, 0.0]]
  """
  leaves = leaves_by_path(params)
  layers = tuple(layers)
  if not layers:
    raise ValueError("layer_features needs at least one layer.")
  for layer in layers:
    if layer not in leaves:
      raise unknown_layer_error(layer, leaves, "the parameters")
    if layer not in deltas:
      raise unknown_layer_error(layer, deltas, "the changes (deltas)")
  sizes = np.asarray([np.size(leaves[layer]) for layer in layers], np.float64)
  log_size = np.log1p(sizes) / np.log1p(sizes.max())
  depth = np.arange(len(layers)) / max(len(layers) - 1, 1)
  change = jnp.stack([
      jnp.linalg.norm(jnp.ravel(deltas[layer]).astype(jnp.float32))
      / jnp.maximum(jnp.linalg.norm(
          jnp.ravel(leaves[layer]).astype(jnp.float32)), 1e-12)
      for layer in layers])
  change = change / jnp.maximum(jnp.max(change), 1e-12)
  static = np.stack([log_size, sizes / sizes.sum(), depth], axis=1)
  return jnp.concatenate(
      [jnp.asarray(static, jnp.float32), change[:, None]], axis=1)


@dataclasses.dataclass(frozen=True)
class Policy:
  """An MLP shared by the layers, from features and budget to gate probabilities.

  ``p_l = sigmoid(mlp([features_l, budget_fraction]) + bias_l)``: one hidden
  tanh layer shared by every layer, and a learned bias per layer so the
  policy can prefer any set of layers that the features do not tell apart.

  Attributes:
    layers: the layers it gates, in the order of the features' rows.
    hidden: the width of the hidden layer.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> policy = budgeted.Policy(('a', 'b'))
    >>> policy_params = policy.init(jax.random.key(0), num_features=4)
    >>> probs = policy.apply(policy_params, jnp.zeros((2, 4)), 0.0)
    >>> probs
    {'a': Array(0.5, dtype=float32), 'b': Array(0.5, dtype=float32)}
  """

  layers: tuple[str, ...]
  hidden: int = 32

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if not self.layers:
      raise ValueError("a Policy needs at least one layer.")
    object.__setattr__(self, "hidden", whole_number(self.hidden, "hidden"))

  def init(self, key: jax.Array, num_features: int,
           initial_probability: float = 0.5) -> dict[str, Any]:
    """The policy's parameters; zero inputs give ``initial_probability``."""
    num_features = whole_number(num_features, "num_features")
    initial_probability = real_number(initial_probability,
                                      "initial_probability")
    if not 0.0 < initial_probability < 1.0:
      raise ValueError(
          f"initial_probability must be in (0, 1), got {initial_probability}.")
    hidden_key, out_key = jax.random.split(key)
    init = jax.nn.initializers.lecun_normal()
    return {
        "hidden": {"kernel": init(hidden_key, (num_features + 1, self.hidden)),
                   "bias": jnp.zeros(self.hidden)},
        "out": {"kernel": init(out_key, (self.hidden, 1)) * 0.1,
                "bias": jnp.full((1,), jnp.log(initial_probability)
                                 - jnp.log1p(-initial_probability))},
        "layer_bias": jnp.zeros(len(self.layers)),
    }

  def logits(self, policy_params: Mapping[str, Any], features: jax.Array,
             budget_fraction: Any) -> jax.Array:
    """The gate logits, one per layer, as an array in the order of ``layers``."""
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2 or features.shape[0] != len(self.layers):
      raise ValueError(
          f"features must have shape [{len(self.layers)}, num_features] (one "
          f"row per layer of the policy), got {features.shape}.")
    fraction = jnp.broadcast_to(
        jnp.asarray(budget_fraction, jnp.float32), (len(self.layers), 1))
    inputs = jnp.concatenate([features, fraction], axis=1)
    hidden = jnp.tanh(inputs @ policy_params["hidden"]["kernel"]
                      + policy_params["hidden"]["bias"])
    out = hidden @ policy_params["out"]["kernel"] + policy_params["out"]["bias"]
    return out[:, 0] + policy_params["layer_bias"]

  def apply(self, policy_params: Mapping[str, Any], features: jax.Array,
            budget_fraction: Any) -> dict[str, jax.Array]:
    """``{layer: p_l}``, the probability that each layer is adapted.

    Args:
      policy_params: from :meth:`init`.
      features: ``[len(layers), num_features]``, e.g. :func:`layer_features`.
      budget_fraction: the budget divided by the candidates' total number of
        parameters (a scalar; a traced one too).
    """
    probs = jax.nn.sigmoid(self.logits(policy_params, features,
                                       budget_fraction))
    return {layer: probs[i] for i, layer in enumerate(self.layers)}


def sample_gates(key: jax.Array, probabilities: Mapping[str, jax.Array]
                 ) -> dict[str, jax.Array]:
  """Straight-through Bernoulli gates: exactly 0 or 1, ``d g_l / d p_l = 1``.

  Each gate is 1 with probability ``p_l``, independently, in the forward
  pass; the gradient reaches ``p_l`` as if the gate were ``p_l`` itself.

  Why this estimator (the SWR paper does not say which it uses, REFERENCE
  §4): the forward pass runs exactly the networks that can be merged (0/1
  gates, as at inference), unlike a relaxed Gumbel/concrete gate, whose
  fractional gates train a model that is never deployed and need a
  temperature schedule; and its gradient has the low variance of TAPS's
  straight-through scores, which SWR builds on, where REINFORCE's variance
  grows with the number of layers (tens to hundreds) and needs a baseline.
  The price is a biased gradient.

  Args:
    key: a JAX random key.
    probabilities: ``{layer: p_l}``, e.g. from :meth:`Policy.apply`.

  Returns:
    ``{layer: g_l}``, float32 scalars.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> probs = {'a': jnp.asarray(1.0), 'b': jnp.asarray(0.0)}
    >>> gates = budgeted.sample_gates(jax.random.key(0), probs)
    >>> float(gates['a']), float(gates['b'])
    (1.0, 0.0)
  """
  layers = list(probabilities)
  p = jnp.stack([jnp.asarray(probabilities[layer], jnp.float32)
                 for layer in layers])
  drawn = (jax.random.uniform(key, p.shape) < p).astype(jnp.float32)
  # p - stop_gradient(p) is exactly 0.0: the value is the 0/1 draw.
  gates = drawn + (p - jax.lax.stop_gradient(p))
  return {layer: gates[i] for i, layer in enumerate(layers)}
