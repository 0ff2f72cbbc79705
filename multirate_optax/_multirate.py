"""The multirate optimizer: fast parameters every step, slow ones every k steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from multirate_optax._groups import (
    FAST, SLOW, Labels, check_labels_fit, labels_like, resolve_labels)
from multirate_optax._schedule import MultirateSchedule, ScheduleState, check_period


class SlowState(NamedTuple):
  """State of the slow group.

  Attributes:
    inner: the slow optimizer's state; it changes on slow steps only.
    held: with drift, the update of the last slow step, applied on every step
      of its cycle; ``None`` without drift.
  """

  inner: optax.OptState
  held: Optional[optax.Updates]


def _slow_group(
    inner: optax.GradientTransformation,
    slow_step: Union[bool, jax.Array, None],
    scale: Union[float, jax.Array],
    drift: bool,
) -> optax.GradientTransformationExtraArgs:
  """The slow optimizer, refreshed on slow steps and held in between."""
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    held = jax.tree.map(jnp.zeros_like, params) if drift else None
    return SlowState(inner.init(params), held)

  def update_fn(updates, state, params=None, **extra_args):
    def refresh():
      new_updates, new_inner = inner.update(
          updates, state.inner, params, **extra_args)
      if not (isinstance(scale, (int, float)) and scale == 1):
        new_updates = jax.tree.map(lambda u: u * scale, new_updates)
      if drift:
        new_updates = jax.tree.map(
            lambda u, h: u.astype(h.dtype), new_updates, state.held)
      return new_updates, SlowState(new_inner, new_updates if drift else None)

    def hold():
      if drift:
        return state.held, state
      shapes, _ = jax.eval_shape(refresh)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state

    if slow_step is True:
      return refresh()
    return jax.lax.cond(slow_step, refresh, hold)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def multirate(
    fast: optax.GradientTransformation,
    slow: Optional[optax.GradientTransformation] = None,
    *,
    labels: Labels,
    period: int,
    drift: bool = False,
    slow_scale: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Multirate training: fast parameters every step, slow ones every ``period``.

  Parameters are labelled ``'fast'`` or ``'slow'``. Step ``t`` (counted from 0
  by this transformation) is a *slow step* when ``t % period == 0``; the other
  steps are *fast steps*. Each group has its own optimizer, combined with
  :func:`optax.partition`:

  * the fast optimizer updates the fast parameters on every step;
  * without drift, the slow optimizer updates the slow parameters on slow steps
    only, its update multiplied by ``slow_scale`` (default ``period``, so that
    with the same optimizer for both groups the slow step size is
    ``h_S = period * h_F`` as in Vlaar & Leimkuhler). On fast steps the slow
    parameters get exactly zero update and the slow optimizer state is left
    untouched (momentum not decayed, count not advanced), whatever gradients
    arrive for them;
  * with ``drift=True`` the slow update computed on a slow step is held and
    applied on every step of its cycle (``slow_scale`` defaults to 1: per step
    ``h_S = h_F``, over a cycle the same total as without drift).

  Give both optimizers the fast rate ``h_F = h / period`` to get the paper's
  method with step size ``h``. Learning-rate schedules: the fast optimizer's
  count advances on every step, so its schedules see the global step. The
  slow optimizer's count advances on slow steps only, so its schedules see the
  number of slow updates so far, ``t // period`` (with or without drift); wrap
  a schedule written in global steps with :func:`in_slow_steps`.

  On fast steps the gradients of slow parameters are ignored, so a train step
  need not compute them: :func:`multirate_optax.train_step` does not.

  Args:
    fast: optimizer of the fast parameters.
    slow: optimizer of the slow parameters; ``None`` means the same as ``fast``
      (with a separate state).
    labels: ``'fast'``/``'slow'`` for each parameter, as a pytree with the
      parameters' structure (or a prefix of it) or a callable returning one,
      as in :func:`optax.partition`; see :func:`fast_by_path` and
      :func:`fast_by_depth`.
    period: ``k >= 1``, the number of steps between slow updates. ``period=1``
      updates every parameter on every step.
    drift: apply the slow update on every step of its cycle (linear drift).
    slow_scale: factor on the slow optimizer's updates; default ``period``
      without drift and 1 with drift.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScheduleState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones(3), 'head': jnp.ones(2)}
    >>> tx = mo.multirate(optax.sgd(0.1, momentum=0.9),
    ...                   labels={'body': 'slow', 'head': 'fast'}, period=2)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(params[k][0]), 4) for k in ('body', 'head')]
    [0.42, 0.439]

  References:
    Vlaar & Leimkuhler, `Multirate Training of Neural Networks
    <https://arxiv.org/abs/2106.10771>`_, ICML 2022.
  """
  schedule = MultirateSchedule(period)
  slow = fast if slow is None else slow
  if slow_scale is None:
    slow_scale = 1.0 if drift else float(period)

  def partition(slow_step, per_leaf_labels: Union[Labels, Callable[[Any], Any]]):
    return optax.partition(
        {FAST: fast, SLOW: _slow_group(slow, slow_step, slow_scale, drift)},
        per_leaf_labels)

  def init_fn(params):
    resolved = resolve_labels(labels, params, (FAST, SLOW))
    if FAST not in resolved:
      raise ValueError(
          "no parameter is labelled 'fast': multirate needs at least one fast "
          "parameter (the labels gave 'slow' to all "
          f"{len(resolved)} leaves).")
    inner = partition(None, labels_like(resolved)).init(params)
    return ScheduleState(count=jnp.zeros([], jnp.int32), inner=inner,
                         schedule=schedule, labels=resolved)

  def update_fn(updates, state, params=None, **extra_args):
    check_labels_fit(state.labels, updates, "the updates")
    slow_step = True if period == 1 else schedule.is_slow_step(state.count)
    updates, inner = partition(slow_step, labels_like(state.labels)).update(
        updates, state.inner, params, **extra_args)
    return updates, state.advanced(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def in_slow_steps(
    schedule: Callable[[jax.Array], jax.Array], period: int
) -> Callable[[jax.Array], jax.Array]:
  """Adapts a schedule written in global steps to the slow optimizer's count.

  The slow optimizer's count is the number of slow updates so far, ``n``; the
  ``n``-th slow update happens at global step ``n * period``. The returned
  schedule evaluates ``schedule`` there.

  Example:
    >>> import optax, multirate_optax as mo
    >>> decay = optax.linear_schedule(0.1, 0.0, transition_steps=100)
    >>> slow = optax.sgd(mo.in_slow_steps(decay, period=5))
    >>> round(float(mo.in_slow_steps(decay, 5)(2)), 6)  # the slow step at t = 10
    0.09
  """
  check_period(period)
  return lambda count: schedule(count * period)
