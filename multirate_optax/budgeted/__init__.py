"""Budgeted transfer: adapt the few layers a parameter budget allows (SWR, TAPS).

Each candidate layer ``l`` (a weight leaf, named by its path) is
reparametrized as ``W_l = W0_l + g_l * dW_l``: ``W0`` is the pretrained
weight, kept frozen; ``dW_l`` is learned, starting at zero; ``g_l`` is a
scalar gate. TAPS learns one score per layer, gated by a threshold with a
straight-through gradient and pushed down by a sparsity penalty. SWR trains
every ``dW_l`` first, then a small policy that gives each layer a gate
probability under a budget on the number of changed parameters. Either way
the final choice is made under the budget by :func:`select_within_budget`,
the chosen layers are trained with :func:`transfer` (no backward work for
the others), and :func:`merge` folds the result into plain weights of the
original architecture. :func:`multirate_optax.checkpoint.save_transfer`
stores only the chosen changes.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from multirate_optax import budgeted
  >>> params = {'body': {'kernel': jnp.ones((4, 4))}, 'head': {'kernel': jnp.ones((4, 2))}}
  >>> layers = budgeted.candidate_layers(params)
  >>> deltas = budgeted.init_deltas(params, layers)
  >>> scores = budgeted.init_scores(layers)
  >>> def loss(trainable, x):
  ...   p = budgeted.apply_deltas(params, trainable['deltas'],
  ...                             budgeted.threshold_gates(trainable['scores']))
  ...   task = jnp.sum((x @ p['body']['kernel'] @ p['head']['kernel']) ** 2)
  ...   return task + budgeted.sparsity_penalty(trainable['scores'])
  >>> grads = jax.grad(loss)({'deltas': deltas, 'scores': scores}, jnp.ones((1, 4)))
  >>> sizes = budgeted.layer_sizes(params, layers)
  >>> budgeted.select_within_budget(scores, sizes, budget=10)
  ('head/kernel',)
"""

from multirate_optax.budgeted._budget import (
    budget_penalty, expected_cost, select_within_budget)
from multirate_optax.budgeted._gate_policy import (
    FEATURE_NAMES, Policy, layer_features, sample_gates)
from multirate_optax.budgeted._reparametrized import (
    apply_deltas, candidate_layers, init_deltas, layer_sizes, merge)
from multirate_optax.budgeted._threshold_gates import (
    init_scores, penalty_weight, sparsity_penalty, threshold_gates)
from multirate_optax.budgeted._transfer import TransferTimetable, transfer

__all__ = (
    "apply_deltas",
    "budget_penalty",
    "candidate_layers",
    "expected_cost",
    "FEATURE_NAMES",
    "init_deltas",
    "init_scores",
    "layer_features",
    "layer_sizes",
    "merge",
    "penalty_weight",
    "Policy",
    "sample_gates",
    "select_within_budget",
    "sparsity_penalty",
    "threshold_gates",
    "transfer",
    "TransferTimetable",
)
