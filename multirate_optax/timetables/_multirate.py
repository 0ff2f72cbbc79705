"""The multirate optimizer: fast parameters every step, slow ones every k steps."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Mapping
from typing import Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax.core._checks import real_number, whole_number
from multirate_optax.core._groups import (
    FAST, SLOW, Labels, leaf_paths, resolve_labels)
from multirate_optax.core._timetable import Step, Timetable
from multirate_optax.core._timetabled import gated, timetabled


@dataclasses.dataclass(frozen=True)
class MultirateTimetable(Timetable):
  """Fast and slow groups; the slow group is active every ``period`` steps.

  Phase 0 (both groups) on steps ``t`` with ``t % period == 0``, the first step
  included; phase 1 (fast group only) on all other steps.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> timetable = mo.MultirateTimetable(period=3)
    >>> [sorted(groups) for groups in timetable.phases]
    [['fast', 'slow'], ['fast']]
    >>> [timetable.phase(t) for t in range(7)]
    [0, 1, 1, 0, 1, 1, 0]
    >>> timetable.phase(jnp.arange(4)), timetable.is_slow_step(6)
    (Array([0, 1, 1, 0], dtype=int32), True)
  """

  period: int

  def __post_init__(self):
    object.__setattr__(self, "period", whole_number(self.period, "period"))

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return (frozenset({FAST, SLOW}), frozenset({FAST}))

  def phase(self, step: Step) -> Step:
    if isinstance(step, (int, np.integer)):
      return int(step % self.period != 0)
    return (step % self.period != 0).astype(jnp.int32)

  def is_slow_step(self, step: Step) -> Step:
    """Whether ``step`` updates the slow group."""
    return step % self.period == 0


def multirate(
    fast: optax.GradientTransformation,
    slow: Optional[optax.GradientTransformation] = None,
    *,
    labels: Labels,
    period: int,
    drift: bool = True,
    slow_scale: Optional[float] = None,
    slow_schedule_steps: Optional[Literal["global", "slow"]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Multirate training: fast parameters every step, slow ones every ``period``.

  Parameters are labelled ``'fast'`` or ``'slow'``. Step ``t`` (counted from 0
  by this transformation) is a *slow step* when ``t % period == 0``; the other
  steps are *fast steps*. Each group has its own optimizer, combined with
  :func:`optax.partition`:

  * the fast optimizer updates the fast parameters on every step;
  * the slow optimizer updates the slow parameters once per cycle of
    ``period`` steps, from the gradient of the cycle's slow step: with drift
    (the default), spread evenly over the cycle (the slow update is held and
    applied on every step, times ``1 / period``); with ``drift=False``, all
    on the slow step. Either way the slow parameters move by one update of
    the slow optimizer per cycle: with ``optax.sgd(h)`` for both groups,
    ``h_F = h`` per step and ``h_S = h`` per cycle. On fast steps the slow
    optimizer state is left untouched (momentum not decayed, count not
    advanced), whatever gradients arrive for the slow parameters.

  Rates: pass the optimizer you would train with; it is the fast optimizer,
  and the slow one unless ``slow`` is given. Vlaar & Leimkuhler's method with
  step size ``h`` is ``multirate(optax.sgd(h / period), optax.sgd(h), ...)``
  (``h_F = h / k``, ``h_S = h``). ``slow_scale`` multiplies the slow updates;
  a slow move of more than one slow-optimizer step per cycle (``slow_scale``
  above 1, or above ``1 / period`` with drift) applies a stale gradient with
  a large step and diverged when training from scratch here, so it warns:
  give the slow optimizer a larger rate instead if you mean it.

  Learning-rate schedules: the fast optimizer's count advances on every step,
  so its schedules see the global step. The slow optimizer's count advances
  on slow steps only (its bias corrections count slow updates). With one
  optimizer for both groups (``slow=None``) its schedules see the global step
  too, by default: a warm-up and decay written in train steps ends at the
  same step for both groups. Their counts (those of ``optax.scale_by_schedule``,
  which ``optax.sgd(schedule)`` and the like use, and of
  ``optax.inject_hyperparams``) are set to the global step before each slow
  update. With ``slow_schedule_steps='slow'`` (the default when ``slow`` is
  given) they see the number of slow updates so far, ``t // period``; wrap a
  schedule written in global steps with :func:`in_slow_steps` then.

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
    drift: spread the slow update over the steps of its cycle (linear
      drift; the default: it trained from scratch where the update at once
      lost 8 points, and fine-tuned as well or better, see the README).
    slow_scale: factor on the slow optimizer's updates as applied on each
      step that moves the slow parameters; default 1 without drift and
      ``1 / period`` with drift (one slow update per cycle).
    slow_schedule_steps: the step the slow optimizer's learning-rate schedules
      see: ``'global'`` (the train step, as the fast optimizer's) or
      ``'slow'`` (the number of slow updates so far). ``None``: ``'global'``
      when ``slow`` is ``None``, ``'slow'`` otherwise.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`TimetableState` with a :class:`MultirateTimetable`.

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
    [0.805, 0.439]

  References:
    Vlaar & Leimkuhler, `Multirate Training of Neural Networks
    <https://arxiv.org/abs/2106.10771>`_, ICML 2022.
  """
  timetable = MultirateTimetable(period)
  if slow_schedule_steps is None:
    slow_schedule_steps = "global" if slow is None else "slow"
  if slow_schedule_steps not in ("global", "slow"):
    raise ValueError("slow_schedule_steps must be 'global', 'slow' or None, "
                     f"got {slow_schedule_steps!r}.")
  slow = fast if slow is None else slow
  if slow_scale is None:
    slow_scale = 1.0 / timetable.period if drift else 1.0
  else:
    slow_scale = real_number(slow_scale, "slow_scale")
    per_cycle = slow_scale * (timetable.period if drift else 1)
    if isinstance(per_cycle, numbers.Real) and per_cycle > 1:
      warnings.warn(
          f"slow_scale={slow_scale:g} moves the slow parameters by "
          f"{per_cycle:g} updates of the slow optimizer per cycle of "
          f"{timetable.period} steps, from one stale gradient; that diverged "
          "when training from scratch (see the README's rates section). If "
          "you mean a larger slow step, give the slow optimizer a larger rate "
          "(multirate(fast, slow, ...)) and leave slow_scale at its default.",
          stacklevel=2)

  def labels_of(params) -> tuple[str, ...]:
    resolved = resolve_labels(labels, params, (FAST, SLOW))
    for group in (FAST, SLOW):
      if group not in resolved:
        other = SLOW if group == FAST else FAST
        paths = leaf_paths(params)
        raise ValueError(
            f"no parameter is labelled {group!r}: multirate needs fast and slow "
            f"parameters, and the labels gave {other!r} to all "
            f"{len(resolved)} leaves, whose paths (what fast_by_path's "
            f"pattern is searched in) are {paths[:12]}"
            + (" ..." if len(paths) > 12 else "") + ". Label at least one "
            f"parameter {group!r}. (Inside optax.inject_hyperparams, a "
            "callable labels argument must be named in static_args, or it is "
            "called with the step count.)")
    return resolved

  rates = {
      FAST: Rate(fast, period=1),
      SLOW: Rate(slow, period=timetable.period, gated=True, scale=slow_scale,
                 hold=drift, global_schedules=slow_schedule_steps == "global"),
  }
  return timetabled(timetable, labels=labels_of, groups=rate_groups(rates))


@dataclasses.dataclass(frozen=True)
class Rate:
  """How one group of a multirate transformation trains.

  Attributes:
    optimizer: the group's optimizer.
    period: the group is updated on steps ``t`` with ``t % period == 0``.
    gated: wrap the optimizer in :func:`gated` (zero or held updates and an
      untouched state off its steps, ``scale`` on its updates); ``False``
      (period 1 and scale 1 only) uses the optimizer itself on every step,
      its state as ``optimizer.init`` makes it.
    scale: the factor on the group's updates.
    hold: repeat the update on the steps up to the next one (linear drift).
    global_schedules: the optimizer's schedules see the global step (see
      :func:`_schedules_at`) rather than the group's own updates.
  """

  optimizer: optax.GradientTransformation
  period: int
  gated: bool = False
  scale: Union[float, jax.Array] = 1.0
  hold: bool = False
  global_schedules: bool = False


def rate_groups(rates: Mapping[str, Rate]):
  """The ``groups`` argument of :func:`timetabled` for groups on their periods.

  The one mechanism of :func:`multirate` (two groups) and
  :func:`~multirate_optax.multirate_groups` (any number).
  """

  def groups(count, active):
    optimizers = {}
    for name, rate in rates.items():
      if not rate.gated:
        optimizers[name] = rate.optimizer
        continue
      on = (None if count is None else
            True if rate.period == 1 else
            name in active if active is not None else
            count % rate.period == 0)
      optimizer = (rate.optimizer
                   if count is None or not rate.global_schedules
                   else _schedules_at(rate.optimizer, count))
      optimizers[name] = gated(optimizer, on, scale=rate.scale, hold=rate.hold)
    return optimizers

  return groups


# The optax states whose count is the step their schedules are evaluated at.
_SCHEDULE_STATES = (optax.ScaleByScheduleState, optax.InjectHyperparamsState,
                    optax.InjectStatefulHyperparamsState)


def _schedules_at(
    inner: optax.GradientTransformation,
    step: jax.Array) -> optax.GradientTransformationExtraArgs:
  """``inner`` with the counts its schedules read set to ``step``.

  Other counts (Adam's bias correction) keep counting ``inner``'s updates.
  """
  inner = optax.with_extra_args_support(inner)

  def at_step(node):
    if isinstance(node, _SCHEDULE_STATES):
      return node._replace(count=jnp.asarray(step, node.count.dtype))
    return node

  def update_fn(updates, state, params=None, **extra_args):
    state = jax.tree.map(at_step, state,
                         is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES))
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def in_slow_steps(
    schedule: optax.Schedule, period: int) -> optax.Schedule:
  """Adapts a learning-rate schedule in global steps to the slow optimizer.

  For a slow optimizer whose schedules see slow updates (one given as
  ``slow``, or ``slow_schedule_steps='slow'``): its count is the number of
  slow updates so far, ``n``; the
  ``n``-th slow update happens at global step ``n * period``. The returned
  schedule evaluates ``schedule`` there.

  Example:
    >>> import optax, multirate_optax as mo
    >>> decay = optax.linear_schedule(0.1, 0.0, transition_steps=100)
    >>> slow = optax.sgd(mo.in_slow_steps(decay, period=5))
    >>> round(float(mo.in_slow_steps(decay, 5)(2)), 6)  # the slow step at t = 10
    0.09
  """
  period = whole_number(period, "period")
  return lambda count: schedule(count * period)
