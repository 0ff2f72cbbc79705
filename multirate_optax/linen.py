"""Multirate training of Flax Linen models: a train state and its train step.

:class:`TrainState` is a fork of ``flax.training.train_state.TrainState`` (as
Flax recommends for optimizers beyond the common case) that also carries the
``batch_stats`` collection. :func:`train_step` wraps the core
:class:`multirate_optax.TrainStep`, so the phase choice, the restricted
backward pass and both dispatch modes are the core's.

BatchNorm on fast steps: the forward pass runs in full on every step, so every
BatchNorm layer, slow ones included, normalises with the batch's statistics
and updates its running statistics on every step. Only the gradients are
restricted: a slow layer's scale and bias do not change on fast steps, but its
running mean and variance keep tracking the activations that the moving fast
(and, with drift, slow) parameters produce, which is what evaluation needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import optax
from flax import struct

from multirate_optax._gradients import check_loss_signature
from multirate_optax._timetable import find_timetable_state
from multirate_optax._dispatch import Dispatch, resolve_dispatch
from multirate_optax._train_step import TrainStep as CoreTrainStep

PyTree = Any


class TrainState(struct.PyTreeNode):
  """Train state of a Linen model under multirate training.

  A fork of ``flax.training.train_state.TrainState``: the same fields plus
  ``batch_stats``, and no ``apply_gradients``: advance it with a step from
  :func:`train_step`, which computes only the gradients the current phase
  uses.

  Attributes:
    step: number of train steps taken (a Python int unless restored as an
      array; it is advanced on the host, so it costs no device work).
    apply_fn: usually ``model.apply``.
    params: the ``'params'`` collection.
    tx: the optimizer; it must contain one :func:`multirate_optax.multirate`.
    opt_state: the optimizer state; its multirate count decides the phase.
    batch_stats: the ``'batch_stats'`` collection, ``{}`` for a model without
      BatchNorm.
  """

  step: Union[int, jax.Array]
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  params: PyTree
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  opt_state: optax.OptState
  batch_stats: PyTree

  @classmethod
  def create(
      cls,
      *,
      apply_fn: Callable[..., Any],
      params: PyTree,
      tx: optax.GradientTransformation,
      batch_stats: Optional[PyTree] = None,
  ) -> "TrainState":
    """A state at step 0 with a freshly initialised optimizer state.

    Args:
      apply_fn: usually ``model.apply``.
      params: ``variables['params']``.
      tx: an optimizer containing one :func:`multirate_optax.multirate`.
      batch_stats: ``variables['batch_stats']``; ``None`` means none.

    Raises:
      ValueError: if ``tx`` holds no timetable, or its labels do not
        fit ``params``.
    """
    opt_state = tx.init(params)
    find_timetable_state(opt_state)  # Fail here rather than at the first step.
    return cls(step=0, apply_fn=apply_fn, params=params, tx=tx,
               opt_state=opt_state,
               batch_stats={} if batch_stats is None else batch_stats)


class TrainStep:
  """A multirate train step on a Linen :class:`TrainState`.

  Call it as ``state, value = step(state, batch, rng)``; ``value`` is the loss,
  or ``(loss, aux)`` with ``has_aux=True``. Build it with :func:`train_step`.
  One core :class:`multirate_optax.TrainStep` is kept per optimizer
  (``state.tx``), so compiled programs and the host-side step count of
  ``'host'`` dispatch carry over from call to call.
  """

  def __init__(self, loss_fn: Callable[..., Any], *, has_aux: bool,
               dispatch: Dispatch, donate: bool):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    check_loss_signature(loss_fn, 3)
    self._loss_fn = loss_fn
    self._has_aux = has_aux
    self.dispatch = resolve_dispatch(dispatch)
    self._donate = donate
    self._core_steps: dict[optax.GradientTransformation, CoreTrainStep] = {}

  def _core_loss(self, params, batch_stats, batch, rng):
    """The user's loss in the core's ``(loss, aux)`` form."""
    out = self._loss_fn(params, batch_stats, batch, rng)
    expected = ("(loss, (new_batch_stats, aux))" if self._has_aux
                else "(loss, new_batch_stats)")
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(f"loss_fn must return {expected} (has_aux="
                      f"{self._has_aux}), got {type(out).__name__}.")
    if self._has_aux and not (isinstance(out[1], tuple) and len(out[1]) == 2):
      raise TypeError(f"loss_fn must return {expected} (has_aux=True), got "
                      f"(loss, {type(out[1]).__name__}).")
    loss, rest = out
    new_batch_stats = rest[0] if self._has_aux else rest
    want = jax.tree.structure(batch_stats)
    got = jax.tree.structure(new_batch_stats)
    if got != want:
      raise ValueError(
          "loss_fn returned new batch_stats whose structure differs from "
          f"state.batch_stats:\n  returned: {got}\n  expected: {want}\n"
          "Return updates['batch_stats'] from "
          "apply(..., mutable=['batch_stats']), or batch_stats itself for a "
          "model without BatchNorm.")
    return loss, rest

  def _core_step(self, tx: optax.GradientTransformation) -> CoreTrainStep:
    if tx not in self._core_steps:
      self._core_steps[tx] = CoreTrainStep(
          self._core_loss, tx, has_aux=True, dispatch=self.dispatch,
          donate=self._donate)
    return self._core_steps[tx]

  def _advanced(self, state: TrainState, params, opt_state, value):
    loss, rest = value
    new_batch_stats, aux = rest if self._has_aux else (rest, None)
    state = state.replace(step=state.step + 1, params=params,
                          opt_state=opt_state, batch_stats=new_batch_stats)
    return state, ((loss, aux) if self._has_aux else loss)

  def __call__(self, state: TrainState, batch: Any, rng: jax.Array):
    params, opt_state, value = self._core_step(state.tx)(
        state.params, state.opt_state, state.batch_stats, batch, rng)
    return self._advanced(state, params, opt_state, value)

  def apply(self, state: TrainState, batch: Any, rng: jax.Array):
    """The uncompiled step, choosing the phase with ``jax.lax.switch``.

    Pure and traceable: use it inside your own ``jax.jit`` or ``lax.scan``.
    """
    params, opt_state, value = self._core_step(state.tx).apply(
        state.params, state.opt_state, state.batch_stats, batch, rng)
    return self._advanced(state, params, opt_state, value)

  def program(self, state: TrainState, batch: Any, rng: jax.Array, *,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program for these arguments.

    See :meth:`multirate_optax.TrainStep.program`.
    """
    return self._core_step(state.tx).program(
        state.params, state.opt_state, state.batch_stats, batch, rng,
        phase=phase)


def train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = True,
) -> TrainStep:
  """Builds a multirate train step for a Linen :class:`TrainState`.

  On slow steps every parameter gets a gradient, on fast steps only the fast
  ones (see :func:`multirate_optax.train_step`). The forward pass, BatchNorm
  statistics and dropout run as usual on every step.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, rng)`` returning
      ``(loss, new_batch_stats)``, or ``(loss, (new_batch_stats, aux))`` with
      ``has_aux=True``. ``new_batch_stats`` is ``updates['batch_stats']`` from
      ``apply(..., mutable=['batch_stats'])``, or ``batch_stats`` unchanged for
      a model without BatchNorm; ``rng`` is the step's dropout key.
    has_aux: whether ``loss_fn`` also returns ``aux``.
    dispatch: ``'cond'``, ``'host'`` or ``'auto'``, as in
      :func:`multirate_optax.train_step`.
    donate: donate the parameter and optimizer-state buffers: the state passed
      in must not be used after the call.

  Returns:
    A :class:`TrainStep`: ``state, value = step(state, batch, rng)`` with
    ``value`` the loss, or ``(loss, aux)`` with ``has_aux=True``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import multirate_optax as mo
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(2, name='head')(x)
    >>> model = Net()
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> def loss_fn(params, batch_stats, batch, rng):
    ...   x, y = batch
    ...   logits, updates = model.apply(
    ...       {'params': params, 'batch_stats': batch_stats}, x, train=True,
    ...       mutable=['batch_stats'], rngs={'dropout': rng})
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    ...   return loss, updates['batch_stats']
    >>> tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path('^head/'),
    ...                   period=4)
    >>> state = mo.linen.TrainState.create(
    ...     apply_fn=model.apply, params=variables['params'], tx=tx,
    ...     batch_stats=variables['batch_stats'])
    >>> step = mo.linen.train_step(loss_fn)
    >>> key = jax.random.key(1)
    >>> for t in range(8):
    ...   state, loss = step(state, (x, y), jax.random.fold_in(key, t))
    >>> state.step
    8
  """
  return TrainStep(loss_fn, has_aux=has_aux, dispatch=dispatch, donate=donate)
