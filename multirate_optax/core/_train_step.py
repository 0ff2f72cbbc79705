"""The compiled train step: gradients of the active parameters only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import jax
import optax

from multirate_optax.core._dispatch import Dispatch, PhaseDispatch
from multirate_optax.core._gradients import (
    check_differentiable, check_loss_signature, value_and_active_grad)
from multirate_optax.core._timetable import find_timetable_state

PyTree = Any


class TrainStep:
  """A jit-compiled train step that differentiates only the active parameters.

  Call it as ``params, opt_state, value = step(params, opt_state, *args)``,
  where ``value`` is what ``loss_fn(params, *args)`` returns (``loss``, or
  ``(loss, aux)`` with ``has_aux=True``). Build it with :func:`train_step`.

  The phase of a step comes from the count in the optimizer state's
  :class:`TimetableState`. With ``'cond'`` dispatch one program holds every
  phase and ``jax.lax.switch`` picks one on the device. With ``'host'``
  dispatch there is one program per phase met, picked from a host-side copy of
  the count: the copy is read from the device once, on the first call and
  whenever the state passed in is not the one this step last returned (a
  restored checkpoint, say), and then advanced on the host, with no
  device-to-host transfer per step.
  """

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      optimizer: optax.GradientTransformation,
      *,
      has_aux: bool,
      dispatch: Dispatch,
      donate: bool,
  ):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._optimizer = optimizer
    self._has_aux = has_aux
    self._dispatch = PhaseDispatch(
        self.apply_phase, state_argnum=1, dispatch=dispatch,
        donate_argnums=(0, 1) if donate else ())
    self.dispatch = self._dispatch.dispatch

  def apply_phase(self, phase: int, params: PyTree, opt_state: PyTree, *args):
    """The uncompiled step of one phase (``phase`` is a static int)."""
    check_loss_signature(self._loss_fn, len(args))
    value, grads = value_and_active_grad(
        self._loss_fn, find_timetable_state(opt_state).active(phase),
        self._has_aux)(params, *args)
    updates, opt_state = self._optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def apply(self, params: PyTree, opt_state: PyTree, *args):
    """The uncompiled step, choosing the phase with ``jax.lax.switch``.

    Pure and traceable: use it inside your own ``jax.jit`` or ``lax.scan``.
    """
    return self._dispatch.apply(params, opt_state, *args)

  def program(self, params: PyTree, opt_state: PyTree, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    Args:
      params, opt_state, *args: as for a call (shapes and dtypes matter).
      phase: with ``'host'`` dispatch, the phase whose program to return;
        ``None`` returns the single ``lax.switch`` program of ``'cond'``.
    """
    with _naming_leaves_jit_refuses(params):
      return self._dispatch.program(params, opt_state, *args, phase=phase)

  def __call__(self, params: PyTree, opt_state: PyTree, *args):
    with _naming_leaves_jit_refuses(params):
      return self._dispatch(params, opt_state, *args)


@contextlib.contextmanager
def _naming_leaves_jit_refuses(params: PyTree) -> Iterator[None]:
  """Turns ``jax.jit``'s refusal of a leaf that is no array into a clear error.

  Float-less arrays are refused while the step is traced
  (:func:`check_differentiable` in the restricted gradient); a function or
  other object among the parameters stops ``jax.jit`` before that, with a
  message that names neither the leaf nor the fix. Checked only on failure,
  so a step costs nothing more.
  """
  try:
    yield
  except TypeError as e:
    check_differentiable(params)
    raise e


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = False,
) -> TrainStep:
  """Builds a compiled train step that skips the backward pass of inactive groups.

  On a slow step every parameter gets a gradient; on a fast step only the fast
  parameters do, the slow ones being closed over as constants, so no backward
  work is done for them. The optimizer must contain exactly one timetable
  (:func:`multirate`, :func:`freezeout` or :func:`random_subgroups`), alone or
  inside ``optax.chain`` and other wrappers.

  Args:
    loss_fn: ``loss_fn(params, *args) -> loss`` or ``(loss, aux)``. ``args``
      are whatever the step is called with after the optimizer state: a batch,
      an rng, Flax mutable collections such as ``batch_stats`` (return their
      new values in ``aux``).
    optimizer: the optimizer, containing a :func:`multirate` transformation.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    dispatch: ``'cond'`` compiles one program and picks the branch on the
      device with ``jax.lax.switch`` (right for GPU/TPU and under
      ``lax.scan``); ``'host'`` compiles one program per phase and picks from
      a host-side counter, with no per-step device-to-host sync (needed on
      CPU, where XLA runs conv weight gradients inside a conditional on a slow
      path); ``'auto'`` (default) is ``'host'`` on CPU and ``'cond'``
      elsewhere.
    donate: donate the parameter and optimizer-state buffers to the step, to
      save memory: the arrays passed in are then consumed (deleted), so keep
      using the ones it returns; a consumed state passed again is refused with
      an error. ``False`` (the default) keeps every earlier state usable.

  Returns:
    A :class:`TrainStep`: ``params, opt_state, value = step(params, opt_state,
    *args)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones((3, 3)), 'head': jnp.ones((3, 1))}
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((jnp.tanh(x @ params['body']) @ params['head'] - y) ** 2)
    >>> tx = mo.multirate(optax.sgd(0.01), labels=mo.fast_by_path('head'), period=4)
    >>> step = mo.train_step(loss_fn, tx)
    >>> opt_state = tx.init(params)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(8):
    ...   params, opt_state, loss = step(params, opt_state, x, y)
    >>> int(opt_state.count)
    8
  """
  return TrainStep(loss_fn, optimizer, has_aux=has_aux, dispatch=dispatch,
                   donate=donate)
