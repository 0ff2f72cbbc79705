"""The parameter budget: its penalty during training and the hard final choice.

The budget counts the parameters a task may change (the sizes of the adapted
layers). While a gate policy trains, the expected number of changed parameters
is penalised once it exceeds the budget (:func:`budget_penalty`); the final
choice of layers (:func:`select_within_budget`) is made on the host and never
exceeds it, whatever the scores.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from multirate_optax.budgeted._reparametrized import check_same_layers

Budget = Union[int, np.integer]


def check_budget(budget: Any) -> int:
  """``budget`` as an int if it is a whole number of parameters > 0, else raises."""
  if isinstance(budget, jax.core.Tracer):
    raise TypeError(
        "the budget must be known when the function is traced (a Python "
        f"int), got a traced value {budget}: mark it static in jax.jit "
        "(static_argnums) or close over it.")
  if isinstance(budget, (jax.Array, np.ndarray)) and budget.shape == ():
    budget = budget.item()
  if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
    raise TypeError(
        f"the budget must be a whole number of parameters (an int > 0), got "
        f"{budget!r} of type {type(budget).__name__}.")
  if isinstance(budget, numbers.Integral):
    budget = int(budget)
  elif math.isnan(budget):
    raise ValueError("the budget is NaN; it must be a whole number of "
                     "parameters (an int > 0).")
  elif not float(budget).is_integer():
    raise TypeError(
        f"the budget must be a whole number of parameters, got {budget!r}; "
        "round it, e.g. int(0.05 * total).")
  if budget <= 0:
    raise ValueError(
        f"the budget must be a number of parameters > 0, got {budget!r}.")
  return int(budget)


def _host_scores(scores: Mapping[str, Any], sizes: Mapping[str, int]
                 ) -> dict[str, float]:
  check_same_layers(sizes, scores, "scores and sizes must name the same layers",
                    "layers with a size but no score",
                    "layers with a score but no size")
  values = {}
  for layer in sizes:
    size = sizes[layer]
    if (isinstance(size, bool) or not isinstance(size, (int, np.integer))
        or size <= 0):
      raise ValueError(
          f"the size of layer {layer!r} must be a number of parameters > 0, "
          f"got {size!r}.")
    score = np.asarray(scores[layer])
    if score.size != 1:
      raise ValueError(
          f"the score of layer {layer!r} must be a scalar, got shape "
          f"{score.shape}.")
    values[layer] = float(score.reshape(()))
    if math.isnan(values[layer]):
      raise ValueError(f"the score of layer {layer!r} is NaN.")
  return values


def select_within_budget(
    scores: Mapping[str, Any],
    sizes: Mapping[str, int],
    budget: Budget,
    *,
    threshold: float = 0.0,
) -> tuple[str, ...]:
  """The layers to adapt: the best-scored ones that fit the budget together.

  Greedy on the host: layers whose score is at least ``threshold`` (those
  the gates prefer on) are taken by descending score, ties in the order of
  ``sizes``, each one only if it still fits; a layer too large for what is
  left is skipped and smaller ones after it may still be taken. The total
  size of the result never exceeds ``budget`` (checked before returning).

  Args:
    scores: ``{layer: score}``, scalars (JAX or numpy arrays or floats): TAPS
      scores, or the gate probabilities of :class:`Policy`.
    sizes: ``{layer: number of parameters}``, from :func:`layer_sizes`; its
      order is the layer order.
    budget: the most parameters that may change, an int > 0.
    threshold: the smallest score a layer may have to be taken: the TAPS
      threshold (0.1) for TAPS scores keeps exactly the layers whose gate is
      on; 0.5 for probabilities keeps those the policy prefers on; the
      default 0 takes any non-negative score.

  Returns:
    The selected layers, in the order of ``sizes``.

  Raises:
    TypeError, ValueError: for a budget that is not a whole number > 0 (NaN
      included), scores and sizes that name different layers, a NaN score,
      or a size that is not a positive int.

  Example:
    >>> from multirate_optax import budgeted
    >>> sizes = {'a': 100, 'b': 60, 'c': 30}
    >>> scores = {'a': 0.9, 'b': 0.8, 'c': 0.2}
    >>> budgeted.select_within_budget(scores, sizes, 100)
    ('a',)
    >>> budgeted.select_within_budget(scores, sizes, 95)
    ('b', 'c')
  """
  budget = check_budget(budget)
  threshold = float(threshold)
  values = _host_scores(scores, sizes)
  order = {layer: i for i, layer in enumerate(sizes)}
  chosen, used = set(), 0
  for layer in sorted(values, key=lambda l: (-values[l], order[l])):
    if values[layer] >= threshold and used + sizes[layer] <= budget:
      chosen.add(layer)
      used += sizes[layer]
  selection = tuple(layer for layer in sizes if layer in chosen)
  total = sum(int(sizes[layer]) for layer in selection)
  if total > budget:
    raise AssertionError(
        f"selected {total} parameters over a budget of {budget}; please "
        "report this bug.")
  return selection


def expected_cost(probabilities: Mapping[str, jax.Array],
                  sizes: Mapping[str, int]) -> jax.Array:
  """The expected number of changed parameters, ``sum_l p_l * n_l``.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> budgeted.expected_cost({'a': jnp.asarray(0.5), 'b': jnp.asarray(1.0)},
    ...                        {'a': 100, 'b': 10})
    Array(60., dtype=float32)
  """
  if set(probabilities) != set(sizes):
    raise ValueError(
        f"probabilities and sizes must name the same layers, got "
        f"{sorted(probabilities)} and {sorted(sizes)}.")
  return sum(jnp.asarray(p, jnp.float32) * float(sizes[layer])
             for layer, p in probabilities.items())


def budget_penalty(probabilities: Mapping[str, jax.Array],
                   sizes: Mapping[str, int], budget: Budget) -> jax.Array:
  """``max(0, expected_cost / budget - 1)``: zero within the budget.

  The overshoot is measured as a fraction of the budget, so one penalty
  weight serves every budget; it is linear, so the policy is pushed back to
  the budget with a constant force rather than one that fades near it.

  Example:
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted
    >>> probs, sizes = {'a': jnp.asarray(0.5), 'b': jnp.asarray(1.0)}, {'a': 100, 'b': 10}
    >>> float(budgeted.budget_penalty(probs, sizes, 60)), float(budgeted.budget_penalty(probs, sizes, 40))
    (0.0, 0.5)
  """
  budget = check_budget(budget)
  return jax.nn.relu(expected_cost(probabilities, sizes) / budget - 1.0)
