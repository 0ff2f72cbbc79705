"""Gradual unfreezing: groups join training top-down, one after another.

As in ULMFiT (Howard & Ruder, 2018), training starts with the top group (the
head) alone and unfreezes the next lower group at each of a list of steps
(one more every epoch, say) until every group trains. The groups not yet
unfrozen are always the lowest ones, so the train step neither
differentiates them nor backpropagates into them: the phases of the
timetable are the sets of groups unfrozen so far. Optionally each group's
rate is that of the group above divided by a factor (ULMFiT's
*discriminative* rates, 2.6), and a learning-rate shape restarts at each
unfreezing (ULMFiT fine-tunes each stage with its own slanted triangular
rates).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Optional

import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax.core._checks import real_number, whole_number
from multirate_optax.core._groups import Labels, leaf_paths, resolve_labels
from multirate_optax.core._timetable import Step, Timetable
from multirate_optax.core._timetabled import gated, timetabled


@dataclasses.dataclass(frozen=True)
class UnfreezingTimetable(Timetable):
  """Groups, top-down, and the step at which each joins training.

  Group ``order[i]`` trains from step ``unfreeze_steps[i]`` on. The first
  group (the head) trains from step 0; the steps never decrease (groups join
  top-down, lower ones later, two groups may join together). Phase ``p``
  holds the groups unfrozen at the ``p``-th distinct unfreeze step.

  Attributes:
    order: the group names, top (nearest the output) first.
    unfreeze_steps: the step at which each group of ``order`` joins.

  Example:
    >>> import multirate_optax as mo
    >>> timetable = mo.UnfreezingTimetable(('head', 'top', 'bottom'), (0, 10, 20))
    >>> [sorted(groups) for groups in timetable.phases]
    [['head'], ['head', 'top'], ['bottom', 'head', 'top']]
    >>> [timetable.phase(t) for t in (0, 9, 10, 20, 1000)]
    [0, 0, 1, 2, 2]
    >>> len(mo.UnfreezingTimetable(('head', 'body'), (0, 0)).phases)  # together
    1
  """

  order: tuple[str, ...]
  unfreeze_steps: tuple[int, ...]

  def __post_init__(self):
    order = tuple(self.order) if not isinstance(self.order, str) else None
    if not order or not all(isinstance(g, str) for g in order):
      raise TypeError(
          "order must be a non-empty sequence of group names (str), top "
          f"group first, got {self.order!r}.")
    repeated = sorted({g for g in order if order.count(g) > 1})
    if repeated:
      raise ValueError(f"order names groups {repeated} more than once.")
    steps = tuple(whole_number(s, "each unfreeze step", minimum=0)
                  for s in self.unfreeze_steps)
    if len(steps) != len(order):
      raise ValueError(
          f"unfreeze_steps has {len(steps)} steps for the {len(order)} groups "
          f"of order {order}; give one step per group.")
    if steps[0] != 0:
      raise ValueError(
          f"the top group {order[0]!r} must train from step 0, got "
          f"unfreeze step {steps[0]}: steps before it would train nothing.")
    for i in range(1, len(steps)):
      if steps[i] < steps[i - 1]:
        raise ValueError(
            f"groups unfreeze top-down, but {order[i]!r} would join at step "
            f"{steps[i]}, before {order[i - 1]!r} above it (step "
            f"{steps[i - 1]}): list the groups top first with non-decreasing "
            "unfreeze steps.")
    object.__setattr__(self, "order", order)
    object.__setattr__(self, "unfreeze_steps", steps)

  @classmethod
  def every(cls, order: Sequence[str], steps: int) -> "UnfreezingTimetable":
    """One more group every ``steps`` steps (every epoch, ULMFiT).

    Example:
      >>> import multirate_optax as mo
      >>> mo.UnfreezingTimetable.every(('head', 'top', 'bottom'), 100)
      UnfreezingTimetable(order=('head', 'top', 'bottom'), unfreeze_steps=(0, 100, 200))
    """
    steps = whole_number(steps, "steps")
    return cls(tuple(order), tuple(i * steps for i in range(len(order))))

  @property
  def _starts(self) -> tuple[int, ...]:
    """The first step of each phase."""
    return tuple(sorted(set(self.unfreeze_steps)))

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return tuple(
        frozenset(g for g, s in zip(self.order, self.unfreeze_steps)
                  if s <= start)
        for start in self._starts)

  def phase(self, step: Step) -> Step:
    if isinstance(step, (int, np.integer)):
      return bisect.bisect_right(self._starts, int(step)) - 1
    return jnp.sum(step >= jnp.asarray(self._starts[1:], jnp.int32),
                   dtype=jnp.int32)

  def steps_since_unfreezing(self, step: Step) -> Step:
    """Steps since the latest unfreezing at or before ``step``."""
    if isinstance(step, (int, np.integer)):
      return int(step) - self._starts[self.phase(step)]
    return step - jnp.asarray(self._starts, jnp.int32)[self.phase(step)]


def gradual_unfreezing(
    optimizer: optax.GradientTransformation,
    timetable: UnfreezingTimetable,
    *,
    labels: Labels,
    discriminative: float = 1.0,
    schedule: Optional[optax.Schedule] = None,
    restart: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Gradual unfreezing: groups join training top-down, as in ULMFiT.

  Each group has its own copy of ``optimizer`` (its own momentum, say). Until
  its unfreeze step a group gets exactly zero update, its optimizer state is
  left untouched and a train step built with :func:`multirate_optax.train_step`
  does no backward work for it (nor below it); from then on it trains every
  step. The updates of group ``i`` (``order[i]``, the head ``i = 0``) are
  multiplied by ``discriminative ** -i`` and by ``schedule`` at the step (or,
  with ``restart``, at the number of steps since the latest unfreezing), so
  with ``optimizer = optax.adam(eta)`` group ``i`` moves with rate
  ``eta * schedule(.) / discriminative ** i``.

  Put everything that changes parameters into ``optimizer`` (weight decay
  included): a transformation chained outside would still move frozen
  groups. Batch-norm statistics are not parameters: keep those of frozen
  groups with :func:`multirate_optax.keep_frozen`.

  Args:
    optimizer: the optimizer of one group, with the head's base rate.
    timetable: the :class:`UnfreezingTimetable`.
    labels: the group of each parameter (one of ``timetable.order``), as a
      pytree with the parameters' structure or a prefix of it, or a callable
      returning one such as :func:`multirate_optax.groups_by_path`. Every
      group needs at least one parameter.
    discriminative: each group's rate is the one above's divided by this
      (ULMFiT: 2.6); 1 gives every group the same rate.
    schedule: a factor on every group's updates as a function of the step,
      e.g. ``optax.linear_onecycle_schedule(..., peak_value=1.0)``;
      ``None`` means 1.
    restart: evaluate ``schedule`` at the steps since the latest unfreezing
      (a warm restart of the shape at each unfreezing) rather than at the
      step.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`multirate_optax.TimetableState` with ``timetable``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones(2), 'head': jnp.ones(2)}
    >>> timetable = mo.UnfreezingTimetable(('head', 'body'), (0, 3))
    >>> tx = mo.gradual_unfreezing(optax.sgd(0.1), timetable,
    ...                            labels={'body': 'body', 'head': 'head'},
    ...                            discriminative=2.0)
    >>> step = mo.train_step(lambda p: jnp.sum(p['body'] + p['head']), tx)
    >>> opt_state = tx.init(params)
    >>> for _ in range(5):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> # head: 5 steps of 0.1; body: 2 steps (from step 3) of 0.1 / 2.
    >>> round(float(params['head'][0]), 4), round(float(params['body'][0]), 4)
    (0.5, 0.9)

  References:
    Howard & Ruder, `Universal Language Model Fine-tuning for Text
    Classification <https://arxiv.org/abs/1801.06146>`_, ACL 2018.
  """
  if not isinstance(timetable, UnfreezingTimetable):
    raise TypeError(
        "timetable must be an UnfreezingTimetable, got "
        f"{type(timetable).__name__}.")
  discriminative = real_number(discriminative, "discriminative")
  if not isinstance(discriminative, (jnp.ndarray, np.ndarray)) and not (
      discriminative > 0):
    raise ValueError(
        f"discriminative must be > 0 (ULMFiT uses 2.6), got {discriminative}.")
  if restart and schedule is None:
    raise ValueError(
        "restart=True restarts the schedule at each unfreezing, but no "
        "schedule was given: pass schedule=, or leave restart False.")
  order = timetable.order

  def labels_of(params) -> tuple[str, ...]:
    per_leaf = resolve_labels(labels, params, order)
    empty = [g for g in order if g not in per_leaf]
    if empty:
      paths = leaf_paths(params)
      raise ValueError(
          f"groups {empty} of the timetable have no parameters; every group "
          f"of {order} needs at least one. The parameters' paths are "
          f"{paths[:12]}" + (" ..." if len(paths) > 12 else "") + ".")
    return per_leaf

  def groups(count, active):
    if count is None:
      return {g: gated(optimizer, None) for g in order}
    if schedule is None:
      shape = 1.0
    else:
      shape = schedule(timetable.steps_since_unfreezing(count) if restart
                       else count)
    return {g: gated(optimizer,
                     g in active if active is not None else
                     count >= timetable.unfreeze_steps[i],
                     scale=shape * discriminative ** -i)
            for i, g in enumerate(order)}

  return timetabled(timetable, labels=labels_of, groups=groups)
