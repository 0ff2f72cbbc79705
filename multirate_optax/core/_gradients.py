"""Gradients restricted to the active parameters.

The inactive leaves are closed over as constants of the differentiated
function, so autodiff builds no backward pass for them: no weight gradients,
and no backpropagation into layers whose every parameter is inactive. Their
gradients are returned as zeros, so optimizers see the usual full tree.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from multirate_optax.core._groups import path_str

PyTree = Any


def check_loss_signature(loss_fn: Callable[..., Any], num_args: int) -> None:
  """Raises a clear TypeError if ``loss_fn(params, *args)`` cannot be called."""
  try:
    signature = inspect.signature(loss_fn)
  except (TypeError, ValueError):
    return  # Builtins and some callables have no signature to check.
  try:
    signature.bind(None, *([None] * num_args))
  except TypeError as e:
    raise TypeError(
        f"loss_fn{signature} cannot be called as loss_fn(params, *args) with "
        f"{num_args} argument(s) after params, as the train step calls it: "
        f"{e}.") from None


def describe(value: Any) -> str:
  """What ``value`` is, in words for an error message (tracers included)."""
  if isinstance(value, tuple):
    return f"a tuple of {len(value)}"
  if isinstance(value, Mapping):
    return f"a mapping with keys {list(value)}"
  shape = getattr(value, "shape", None)
  if shape is None:
    return f"a {type(value).__name__}"
  return "a scalar array" if shape == () else f"an array of shape {shape}"


def _not_differentiable(leaf: Any) -> str | None:
  """What ``leaf`` is if ``jax.grad`` cannot differentiate it, else ``None``."""
  if isinstance(leaf, float):
    return None
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return f"a {type(leaf).__name__}"
  if jnp.issubdtype(dtype, jnp.inexact):
    return None
  return f"an array of dtype {dtype}"


def check_differentiable(params: PyTree) -> None:
  """Raises a TypeError naming the leaves of ``params`` that are not floats.

  ``jax.grad`` refuses them ("grad requires real- or complex-valued
  inputs"), and ``jax.jit`` refuses leaves that are no arrays at all; both
  say neither which leaf nor what to do. Whole Equinox models are the usual
  cause: their functions, ints and flags are leaves too.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  found = [(path, what) for path, leaf in flat
           if (what := _not_differentiable(leaf)) is not None]
  if not found:
    return
  listed = ", ".join(f"{path_str(path)!r} ({what})" for path, what in found[:6])
  raise TypeError(
      f"the parameters have {len(found)} of {len(flat)} leaves that are not "
      f"floating-point arrays, which cannot be differentiated: {listed}"
      + (", ..." if len(found) > 6 else "") + ". Pass only the arrays to "
      "train: for an Equinox model, use multirate_optax.equinox.train_step, "
      "which takes the whole model, or split it with params, static = "
      "eqx.partition(model, eqx.is_inexact_array) and rebuild it in the loss "
      "with eqx.combine(params, static); otherwise pass the other leaves as "
      "arguments after the optimizer state, or close over them in loss_fn.")


def checked_loss(loss_fn: Callable[..., Any], has_aux: bool):
  """``loss_fn``, raising a clear TypeError when its output is not a loss."""
  def loss(params, *args):
    out = loss_fn(params, *args)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        hint = ("; if it returns the loss alone, build the step with "
                "has_aux=False" if getattr(out, "shape", None) == () else "")
        raise TypeError(
            "with has_aux=True, loss_fn must return (loss, aux), got "
            f"{describe(out)}{hint}.")
      value = out[0]
    else:
      value = out
    shape = getattr(value, "shape", None)
    if shape != ():
      hint = ("" if has_aux or not isinstance(out, tuple)
              else "; if it returns (loss, aux), pass has_aux=True")
      raise TypeError(
          f"loss_fn must return a scalar loss, got {describe(value)}{hint}.")
    return out

  return loss


def value_and_active_grad(
    loss_fn: Callable[..., Any],
    active: Sequence[bool],
    has_aux: bool,
    value_and_grad: Callable[..., Callable[..., tuple[Any, ...]]] = (
        jax.value_and_grad),
) -> Callable[..., tuple[Any, ...]]:
  """Like ``jax.value_and_grad``, differentiating only the active leaves.

  Args:
    loss_fn: ``loss_fn(params, *args) -> loss`` or ``(loss, aux)``.
    active: for each leaf of ``params`` (``jax.tree.leaves`` order), whether
      to differentiate with respect to it.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    value_and_grad: ``value_and_grad(fun, has_aux=...)`` returning a function
      whose outputs end with the gradients: ``jax.value_and_grad``, or one
      that also averages them over devices, or Flax's
      ``DynamicScale.value_and_grad`` (scaled loss, unscaled gradients).

  Returns:
    ``f(params, *args) -> (*outputs, grads)``: ``value_and_grad``'s outputs,
    for ``jax.value_and_grad`` ``(value, grads)`` where ``value`` is what
    ``loss_fn`` returns; ``grads`` has the structure of ``params``, with zeros
    for the inactive leaves.
  """
  active = tuple(active)
  loss = checked_loss(loss_fn, has_aux)

  def value_and_restricted_grad(params, *args):
    check_differentiable(params)
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != len(active):
      raise ValueError(
          f"the parameters have {len(leaves)} leaves, but the optimizer was "
          f"built for {len(active)}: pass the parameters (the model) the "
          "optimizer was built for.")

    def restricted_loss(active_leaves, *args):
      it = iter(active_leaves)
      merged = [next(it) if a else leaf for leaf, a in zip(leaves, active)]
      return loss(jax.tree.unflatten(treedef, merged), *args)

    active_leaves = [leaf for leaf, a in zip(leaves, active) if a]
    *outputs, active_grads = value_and_grad(restricted_loss, has_aux=has_aux)(
        active_leaves, *args)
    it = iter(active_grads)
    grads = [next(it) if a else jnp.zeros_like(leaf)
             for leaf, a in zip(leaves, active)]
    return (*outputs, jax.tree.unflatten(treedef, grads))

  return value_and_restricted_grad
