"""Timetables of active groups: which parameter groups receive gradients when.

A timetable splits training into a few *phases*, each with its own set of
active groups, and maps a step count to the phase of that step. (It is not an
``optax.Schedule``, which gives a learning rate per step.) The optimizer keeps
the count, and as static data the timetable and the group of every leaf, in a
:class:`TimetableState`; the train step reads it to compute gradients only for
the active groups of the current phase.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Union

import jax
import optax

Step = Union[int, jax.Array]


class Timetable(abc.ABC):
  """Which groups are active at each step.

  Subclasses are frozen dataclasses (hashable, compared by value), because a
  timetable is static data of the optimizer state and of compiled programs.

  Example:
    A timetable that trains the head alone for ``warmup`` steps, then every
    group; :meth:`phase` takes a Python int (host dispatch) or a traced
    array (``lax.switch``):

    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> @dataclasses.dataclass(frozen=True)
    ... class HeadFirst(mo.Timetable):
    ...   warmup: int
    ...   @property
    ...   def phases(self):
    ...     return (frozenset({'head'}), frozenset({'head', 'body'}))
    ...   def phase(self, step):
    ...     if isinstance(step, int):
    ...       return int(step >= self.warmup)
    ...     return (step >= self.warmup).astype(jnp.int32)
    >>> timetable = HeadFirst(warmup=2)
    >>> [timetable.phase(t) for t in range(4)], sorted(timetable.groups)
    ([0, 0, 1, 1], ['body', 'head'])
    >>> timetable.phase(jnp.arange(4))
    Array([0, 0, 1, 1], dtype=int32)
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
    """Every group the timetable knows."""
    return frozenset().union(*self.phases)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TimetableState:
  """Optimizer state of a transformation that follows a timetable.

  Attributes:
    count: number of updates so far (int32 scalar): the step the timetable
      sees.
    inner: the state of the per-group optimizers.
    timetable: the timetable (static).
    labels: the group of every parameter leaf, in ``jax.tree.leaves`` order
      (static).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> tx = mo.multirate(optax.sgd(0.1), labels={'body': 'slow', 'head': 'fast'},
    ...                   period=3)
    >>> state = tx.init({'body': jnp.ones(2), 'head': jnp.ones(2)})
    >>> state.timetable, state.labels, int(state.count)
    (MultirateTimetable(period=3), ('slow', 'fast'), 0)
    >>> state.active(0), state.active(1)  # (body, head) in each phase
    ((True, True), (False, True))
  """

  count: jax.Array
  inner: Any
  timetable: Timetable = dataclasses.field(metadata=dict(static=True))
  labels: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

  def active(self, phase: int) -> tuple[bool, ...]:
    """For each parameter leaf, whether it receives gradients in ``phase``."""
    phases = self.timetable.phases
    if not 0 <= phase < len(phases):
      raise ValueError(
          f"phase {phase!r} is not a phase of {self.timetable!r}, which has "
          f"{len(phases)} (0 to {len(phases) - 1}).")
    return tuple(label in phases[phase] for label in self.labels)

  def advanced(self, inner: Any) -> "TimetableState":
    """The state after one more update, with new inner state ``inner``."""
    return dataclasses.replace(
        self, count=optax.safe_increment(self.count), inner=inner)


class Located(NamedTuple):
  """A :class:`TimetableState` and the types of the nodes that enclose it.

  Attributes:
    state: the timetable state.
    enclosing: the type of every node on the way from the root of the
      optimizer state down to ``state``, outermost first (``tuple`` for
      ``optax.chain``, ``optax.MaskedState`` for ``optax.masked``, ...).
  """

  state: TimetableState
  enclosing: tuple[type, ...]


def locate_timetable_state(opt_state: Any) -> Located:
  """Finds the one :class:`TimetableState` in an optimizer state.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found: list[Located] = []

  def visit(node: Any, enclosing: tuple[type, ...]) -> None:
    if isinstance(node, TimetableState):
      found.append(Located(node, enclosing))
      return
    children = jax.tree_util.tree_leaves(
        node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:
      return
    for child in children:
      visit(child, enclosing + (type(node),))

  visit(opt_state, ())
  if not found:
    raise ValueError(
        "the optimizer state holds no timetable of active groups: build the "
        "optimizer with multirate_optax.multirate (or freezeout, "
        "random_subgroups), alone or inside optax.chain and other wrappers, "
        "and pass its state.")
  if len(found) > 1:
    raise ValueError(
        f"the optimizer state holds {len(found)} timetables of active groups; "
        "a train step follows exactly one.")
  return found[0]


def find_timetable_state(opt_state: Any) -> TimetableState:
  """The one :class:`TimetableState` in an optimizer state.

  Args:
    opt_state: the state of an optimizer built with
      :func:`multirate_optax.multirate`, :func:`~multirate_optax.freezeout` or
      :func:`~multirate_optax.random_subgroups`, alone or inside
      ``optax.chain`` and other wrappers.

  Raises:
    ValueError: if there is none, or more than one.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> tx = optax.chain(optax.clip(1.0), mo.multirate(
    ...     optax.sgd(0.1), labels={'w': 'fast', 'b': 'slow'}, period=3))
    >>> state = mo.find_timetable_state(tx.init({'w': jnp.ones(2), 'b': jnp.ones(1)}))
    >>> state.timetable, state.labels, int(state.count)
    (MultirateTimetable(period=3), ('slow', 'fast'), 0)
  """
  return locate_timetable_state(opt_state).state
