"""TAPS gates: one learned score per layer, the gate on while the score is above a threshold.

The gate of layer ``l`` is ``1[s_l >= threshold]`` in the forward pass, with
the straight-through (identity) gradient ``d gate / d s = 1`` in the backward
pass, so ``d loss / d s_l = <d loss / d W_l, dW_l>``: a layer whose change
lowers the loss gets its score raised. The sparsity penalty ``mean_l |s_l|``
(weighted by the caller, after a warm-up) pushes scores down, turning off
layers whose change does not pay for itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp

from multirate_optax.core._checks import real_number, whole_number

Scores = Mapping[str, jax.Array]


def init_scores(layers: Iterable[str], value: float = 0.15,
                dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
  """One score per layer, all ``value`` (TAPS: 0.15, above its threshold 0.1).

  Example:
    >>> from multirate_optax import budgeted
    >>> budgeted.init_scores(['a/kernel', 'b/kernel'])
    {'a/kernel': Array(0.15, dtype=float32), 'b/kernel': Array(0.15, dtype=float32)}
  """
  value = real_number(value, "value")
  return {layer: jnp.asarray(value, dtype) for layer in layers}


def threshold_gates(scores: Scores, threshold: float = 0.1
                    ) -> dict[str, jax.Array]:
  """Hard gates ``1[s >= threshold]`` with a straight-through gradient to ``s``.

  Args:
    scores: ``{layer: s_l}``, scalar scores.
    threshold: the threshold ``tau`` (TAPS: 0.1).

  Returns:
    ``{layer: g_l}``: exactly 0.0 or 1.0 forward; ``d g_l / d s_l = 1``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> scores = {'a': jnp.asarray(0.15), 'b': jnp.asarray(0.05)}
    >>> budgeted.threshold_gates(scores)
    {'a': Array(1., dtype=float32), 'b': Array(0., dtype=float32)}
    >>> float(jax.grad(lambda s: 3.0 * budgeted.threshold_gates(s)['b'])(scores)['b'])
    3.0
  """
  threshold = real_number(threshold, "threshold")

  def gate(score):
    score = jnp.asarray(score)
    hard = (score >= threshold).astype(score.dtype)
    # score - stop_gradient(score) is exactly 0.0: the value is the hard gate.
    return score - jax.lax.stop_gradient(score) + jax.lax.stop_gradient(hard)

  return {layer: gate(score) for layer, score in scores.items()}


def sparsity_penalty(scores: Scores) -> jax.Array:
  """The TAPS penalty ``mean_l |s_l|`` (multiply by its weight yourself).

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> budgeted.sparsity_penalty({'a': jnp.asarray(0.3), 'b': jnp.asarray(-0.1)})
    Array(0.2, dtype=float32)
  """
  if not scores:
    raise ValueError("sparsity_penalty needs at least one score.")
  return jnp.mean(jnp.stack([jnp.abs(jnp.asarray(s)) for s in scores.values()]))


def penalty_weight(step: jax.Array, weight: float, warmup_steps: int
                   ) -> jax.Array:
  """``weight`` from step ``warmup_steps`` on, 0 before (TAPS's warm-up).

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> [float(budgeted.penalty_weight(jnp.asarray(t), 1.0, 2)) for t in range(4)]
    [0.0, 0.0, 1.0, 1.0]
  """
  weight = real_number(weight, "weight")
  warmup_steps = whole_number(warmup_steps, "warmup_steps", minimum=0)
  return jnp.where(jnp.asarray(step) >= warmup_steps, weight, 0.0)
