"""Schedules of active groups: which parameter groups receive gradients when.

A schedule splits training into a few *phases*, each with its own set of
active groups, and maps a step count to the phase of that step. The optimizer
keeps the count (and, as static data, the schedule and the group of every
leaf) in a :class:`ScheduleState`; the train step reads it to compute gradients
only for the active groups of the current phase.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

from multirate_optax._groups import FAST, SLOW

Step = Union[int, jax.Array]


class Schedule(abc.ABC):
  """Which groups are active at each step.

  Subclasses are frozen dataclasses (hashable, compared by value), because a
  schedule is static data of the optimizer state and of compiled programs.
  """

  @property
  @abc.abstractmethod
  def phases(self) -> tuple[frozenset[str], ...]:
    """The set of active groups of each phase."""

  @abc.abstractmethod
  def phase(self, step: Step) -> Step:
    """The index into :attr:`phases` of step ``step``.

    Works on a Python int (returns an int, for host-side dispatch) and on a
    traced integer array (returns an int32 array, for ``lax.switch``).
    """

  @property
  def groups(self) -> frozenset[str]:
    """Every group the schedule knows."""
    return frozenset().union(*self.phases)


def check_period(period: Any) -> int:
  """Returns ``period`` if it is an int >= 1, else raises a clear error."""
  if isinstance(period, bool) or not isinstance(period, int):
    raise TypeError(
        f"period must be an int >= 1, got {period!r} of type "
        f"{type(period).__name__}.")
  if period < 1:
    raise ValueError(f"period must be an int >= 1, got {period}.")
  return period


@dataclasses.dataclass(frozen=True)
class MultirateSchedule(Schedule):
  """Fast and slow groups; the slow group is active every ``period`` steps.

  Phase 0 (both groups) on steps ``t`` with ``t % period == 0``, the first step
  included; phase 1 (fast group only) on all other steps.
  """

  period: int

  def __post_init__(self):
    check_period(self.period)

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return (frozenset({FAST, SLOW}), frozenset({FAST}))

  def phase(self, step: Step) -> Step:
    if isinstance(step, int):
      return int(step % self.period != 0)
    return (step % self.period != 0).astype(jnp.int32)

  def is_slow_step(self, step: Step) -> Step:
    """Whether ``step`` updates the slow group."""
    return step % self.period == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScheduleState:
  """Optimizer state of a transformation that follows a group schedule.

  Attributes:
    count: number of updates so far (int32 scalar): the step the schedule sees.
    inner: the state of the per-group optimizers.
    schedule: the schedule (static).
    labels: the group of every parameter leaf, in ``jax.tree.leaves`` order
      (static).
  """

  count: jax.Array
  inner: Any
  schedule: Schedule = dataclasses.field(metadata=dict(static=True))
  labels: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

  def active(self, phase: int) -> tuple[bool, ...]:
    """For each parameter leaf, whether it receives gradients in ``phase``."""
    groups = self.schedule.phases[phase]
    return tuple(label in groups for label in self.labels)

  def advanced(self, inner: Any) -> "ScheduleState":
    """The state after one more update, with new inner state ``inner``."""
    return dataclasses.replace(
        self, count=optax.safe_increment(self.count), inner=inner)


# Wrappers that may keep the inner state unchanged on some updates: inside them
# the count does not advance once per train step, so a host-side counter would
# drift from it.
_SKIPPING_STATES = (optax.ApplyIfFiniteState, optax.MultiStepsState)


def find_schedule_state(opt_state: Any) -> tuple[ScheduleState, bool]:
  """Finds the one :class:`ScheduleState` in an optimizer state.

  Returns:
    The state, and whether it sits inside a wrapper that can skip updates
    (``optax.apply_if_finite``, ``optax.MultiSteps``).

  Raises:
    ValueError: if there is none, or more than one.
  """
  found: list[tuple[ScheduleState, bool]] = []

  def visit(node: Any, inside_skipping: bool) -> None:
    if isinstance(node, ScheduleState):
      found.append((node, inside_skipping))
      return
    inside_skipping = inside_skipping or isinstance(node, _SKIPPING_STATES)
    children = jax.tree_util.tree_leaves(
        node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:
      return
    for child in children:
      visit(child, inside_skipping)

  visit(opt_state, False)
  if not found:
    raise ValueError(
        "the optimizer state holds no schedule of active groups: build the "
        "optimizer with multirate_optax.multirate (or freezeout, "
        "random_subgroups), alone or inside optax.chain and other wrappers, "
        "and pass its state.")
  if len(found) > 1:
    raise ValueError(
        f"the optimizer state holds {len(found)} schedules of active groups; a "
        "train step follows exactly one.")
  return found[0]
