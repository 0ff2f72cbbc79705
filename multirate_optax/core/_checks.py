"""Checks of user arguments that several modules share, with clear errors."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

# What optax.inject_hyperparams does to arguments it is not told are static.
_INJECT_HYPERPARAMS_HINT = (
    "If this transformation is built by optax.inject_hyperparams, which turns "
    "numbers into arrays and calls callables with the step count, name the "
    "structural arguments in static_args, e.g. optax.inject_hyperparams("
    "mo.multirate, static_args=('labels', 'period', 'drift')).")


def whole_number(value: Any, name: str, minimum: int = 1) -> int:
  """``value`` as an int if it is a whole number ``>= minimum``, else raises.

  Python and numpy integers are accepted; bools, floats and JAX arrays are not
  (a traced value cannot fix the structure of a program).
  """
  if isinstance(value, (jax.Array, np.ndarray)):
    raise TypeError(
        f"{name} must be a Python or numpy int >= {minimum}, got an array "
        f"({value!r}). {_INJECT_HYPERPARAMS_HINT}")
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{name} must be an int >= {minimum}, got {value!r} of type "
        f"{type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
  return int(value)


def real_number(value: Any, name: str) -> Any:
  """``value`` if it is a real number or a real scalar array, else raises."""
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.shape == () and (jax.numpy.issubdtype(value.dtype, np.floating)
                              or jax.numpy.issubdtype(value.dtype, np.integer)):
      return value
  elif isinstance(value, numbers.Real) and not isinstance(value, bool):
    return value
  raise TypeError(
      f"{name} must be a real number (or a real scalar array), got {value!r} "
      f"of type {type(value).__name__}.")


def not_a_step_count(tree: Any, what: str) -> None:
  """Raises if ``tree`` is a bare integer array, as a step count would be.

  Labels functions are called with parameters; ``optax.inject_hyperparams``
  calls any callable argument it is not told is static with the step count.
  """
  if isinstance(tree, (jax.Array, np.ndarray)) and tree.shape == () and (
      jax.numpy.issubdtype(tree.dtype, np.integer)):
    raise TypeError(
        f"{what} was called with an integer scalar array, not with "
        f"parameters. {_INJECT_HYPERPARAMS_HINT}")
