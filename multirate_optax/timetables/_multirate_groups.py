"""Multirate with any number of groups, each updated on its own period.

The head every step, the last stage every 2 steps, the backbone every 8, say:
each group has its own period and optimizer, and its own linear drift. A
step's *phase* is the set of groups it updates; over a cycle of the least
common multiple of the periods the distinct sets are the phases of the
timetable (three here: every group on step 0, head and last stage on steps
2, 4, 6, the head alone on odd steps), each compiled once by a train step
(``'host'`` dispatch) or one branch of its ``lax.switch`` (``'cond'``). The
two-group :func:`~multirate_optax.multirate` is the case of periods 1 and
``k`` and shares its mechanism.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax.core._checks import real_number, whole_number
from multirate_optax.core._groups import Labels, leaf_paths, resolve_labels
from multirate_optax.core._timetable import Step, Timetable
from multirate_optax.core._timetabled import timetabled
from multirate_optax.timetables._multirate import Rate, rate_groups

# The cycle (the least common multiple of the periods) is enumerated once, on
# the host, when the timetable is built; each phase is a compiled program
# ('host') or a branch of one ('cond'), so more than a few dozen would spend
# more time compiling than they save.
MAX_CYCLE = 1_000_000
MAX_PHASES = 64


@dataclasses.dataclass(frozen=True)
class MultirateGroupsTimetable(Timetable):
  """Groups, each active on the steps ``t`` with ``t % period == 0``.

  The periods are kept sorted (shortest first, then by name), so the same
  groups and periods give the same timetable in any order. Phase ``i`` is the
  ``i``-th distinct set of active groups met over a cycle of
  :attr:`cycle` steps from step 0; phase 0 is every group (step 0).

  Attributes:
    periods: ``(group, period)`` pairs; a mapping ``{group: period}`` is
      accepted too.

  Example:
    >>> import multirate_optax as mo
    >>> tt = mo.MultirateGroupsTimetable({'backbone': 6, 'head': 1, 'top': 2})
    >>> tt
    MultirateGroupsTimetable(periods=(('head', 1), ('top', 2), ('backbone', 6)))
    >>> tt.cycle, [sorted(p) for p in tt.phases]
    (6, [['backbone', 'head', 'top'], ['head'], ['head', 'top']])
    >>> [tt.phase(t) for t in range(7)]
    [0, 1, 2, 1, 2, 1, 0]
  """

  periods: tuple[tuple[str, int], ...]

  def __post_init__(self):
    pairs = (tuple(self.periods.items()) if isinstance(self.periods, Mapping)
             else self.periods)
    if (isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs
        or not all(isinstance(p, Sequence) and len(p) == 2 for p in pairs)):
      raise TypeError(
          "periods must be a non-empty mapping {group: period} (or sequence "
          f"of (group, period) pairs), got {self.periods!r}.")
    names = [name for name, _ in pairs]
    for name in names:
      if not isinstance(name, str):
        raise TypeError(f"group names must be str, got {name!r} of type "
                        f"{type(name).__name__} in periods {self.periods!r}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"periods names groups {repeated} more than once.")
    pairs = tuple(sorted(
        ((name, whole_number(period, f"the period of group {name!r}"))
         for name, period in pairs), key=lambda p: (p[1], p[0])))
    object.__setattr__(self, "periods", pairs)
    cycle = math.lcm(*(p for _, p in pairs))
    if cycle > MAX_CYCLE:
      raise ValueError(
          f"the periods {dict(pairs)} repeat only every {cycle} steps (their "
          f"least common multiple), more than the {MAX_CYCLE} this timetable "
          "enumerates: choose periods that divide one another (1, 2, 8) or "
          "share factors.")
    distinct = sorted({p for _, p in pairs})
    steps = np.arange(cycle)
    pattern_of_step = np.stack([steps % p == 0 for p in distinct], axis=1)
    patterns, first = np.unique(pattern_of_step, axis=0, return_index=True)
    patterns = patterns[np.argsort(first)]  # In order of first occurrence.
    if len(patterns) > MAX_PHASES:
      raise ValueError(
          f"the periods {dict(pairs)} give {len(patterns)} distinct sets of "
          f"active groups (phases) over their cycle of {cycle} steps, more "
          f"than {MAX_PHASES}: each phase is a compiled program (or a branch "
          "of one). Choose periods that divide one another (1, 2, 8), or "
          "fewer distinct periods.")
    object.__setattr__(self, "_distinct", tuple(distinct))
    object.__setattr__(self, "_patterns", patterns)
    object.__setattr__(self, "_phase_of_pattern", {
        tuple(bool(x) for x in pattern): i
        for i, pattern in enumerate(patterns)})
    object.__setattr__(self, "_phases", tuple(
        frozenset(name for name, p in pairs if pattern[distinct.index(p)])
        for pattern in patterns))

  @property
  def cycle(self) -> int:
    """Steps after which the timetable repeats: the periods' lcm."""
    return math.lcm(*(p for _, p in self.periods))

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return self._phases

  def phase(self, step: Step) -> Step:
    if isinstance(step, (int, np.integer)):
      return self._phase_of_pattern[
          tuple(int(step) % p == 0 for p in self._distinct)]
    # A pattern of which distinct periods divide the step, compared with
    # each phase's: a few scalar operations, no table over the cycle.
    divides = step % jnp.asarray(self._distinct, jnp.int32) == 0
    matches = jnp.all(divides == jnp.asarray(self._patterns), axis=1)
    return jnp.sum(jnp.where(matches, jnp.arange(len(self._patterns)), 0),
                   dtype=jnp.int32)


def multirate_groups(
    optimizers: Union[optax.GradientTransformation,
                      Mapping[str, optax.GradientTransformation]],
    *,
    labels: Labels,
    periods: Mapping[str, int],
    drift: Union[bool, Mapping[str, bool]] = True,
    scales: Optional[Mapping[str, Union[float, jax.Array]]] = None,
    schedule_steps: Optional[Literal["global", "group"]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Multirate with any number of groups, each updated every ``period`` steps.

  Each group ``g`` with period ``p`` has its own optimizer, which updates it
  on the steps ``t`` with ``t % p == 0`` (step 0 included) from that step's
  gradient: with drift (the default), spread evenly over the ``p`` steps up
  to the next one (the update is held and applied on each, times ``1 / p``);
  with ``drift=False``, all on that step. Either way the group moves by one
  update of its optimizer per ``p`` steps. On the other steps its optimizer
  state is left untouched (momentum not decayed, count not advanced) and a
  train step built with :func:`multirate_optax.train_step` does no backward
  work for it. Period 1 is every step: that group's optimizer is used as it
  is (with scale 1). :func:`~multirate_optax.multirate` is the case of two
  groups, ``'fast'`` with period 1 and ``'slow'`` with period ``k``, and
  gives the same bits.

  Rates: with ``optax.sgd(h)`` for a group of period ``p``, it moves by
  ``h`` times a gradient every ``p`` steps; give longer-period groups larger
  rates if you want them to keep up (Vlaar & Leimkuhler's ``h_F = h / k``,
  ``h_S = h`` for two). A scale above one update per period (above 1 without
  drift, above ``1 / p`` with it) applies a stale gradient with a large step
  and warns, as multirate's ``slow_scale`` does.

  Learning-rate schedules, as for multirate's slow group: with one optimizer
  for every group (``optimizers`` a single transformation) its schedules see
  the global step in every group by default, so a warm-up and decay written
  in train steps end at the same step for all (the counts of
  ``optax.scale_by_schedule`` and ``optax.inject_hyperparams`` are set to
  the step before each update; Adam's bias correction still counts the
  group's own updates). With a mapping of optimizers they see, by default,
  the group's own number of updates so far, ``t // p`` (wrap a schedule in
  global steps with :func:`multirate_optax.in_slow_steps` and the group's
  period). ``schedule_steps`` chooses for every group. A period-1 group's
  count is the step either way.

  Args:
    optimizers: one optimizer, copied into every group (each its own state),
      or ``{group: optimizer}`` for every group of ``periods``.
    labels: the group of each parameter, as a pytree with the parameters'
      structure (or a prefix of it) or a callable returning one such as
      :func:`multirate_optax.groups_by_path`. Every group needs at least one
      parameter.
    periods: ``{group: period}``, each period an int ``>= 1``. Their least
      common multiple (the cycle) is at most 1,000,000 steps and the distinct
      sets of active groups over it (the phases, each a compiled program) at
      most 64.
    drift: linear drift for every group, or ``{group: bool}`` (groups not
      named drift); meaningless for period 1.
    scales: ``{group: factor}`` on the group's updates as applied on each
      step that moves it; a group not named gets ``1 / period`` with drift
      and 1 without (one update of its optimizer per period).
    schedule_steps: ``'global'`` (the train step) or ``'group'`` (the
      group's own updates); ``None``: ``'global'`` for one optimizer,
      ``'group'`` for a mapping.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`multirate_optax.TimetableState` with a
    :class:`MultirateGroupsTimetable`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones(2), 'top': jnp.ones(2), 'head': jnp.ones(2)}
    >>> tx = mo.multirate_groups(
    ...     optax.sgd(0.1), labels={'body': 'body', 'top': 'top', 'head': 'head'},
    ...     periods={'head': 1, 'top': 2, 'body': 4}, drift=False)
    >>> step = mo.train_step(lambda p: jnp.sum(p['body'] + p['top'] + p['head']), tx)
    >>> opt_state = tx.init(params)
    >>> for _ in range(4):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> # In 4 steps: head 4 updates of 0.1, top 2 (steps 0, 2), body 1.
    >>> [round(float(params[k][0]), 4) for k in ('head', 'top', 'body')]
    [0.6, 0.8, 0.9]
  """
  timetable = MultirateGroupsTimetable(
      tuple(periods.items()) if isinstance(periods, Mapping) else periods)
  period_of = dict(timetable.periods)
  groups = tuple(period_of)
  shared = not isinstance(optimizers, Mapping)
  if shared:
    if not isinstance(optimizers, optax.GradientTransformation):
      raise TypeError(
          "optimizers must be an optax.GradientTransformation (given to every "
          "group) or a mapping {group: optimizer}, got "
          f"{type(optimizers).__name__}.")
    optimizer_of = {g: optimizers for g in groups}
  else:
    _same_groups(optimizers, groups, "optimizers", every=True)
    optimizer_of = dict(optimizers)
  if isinstance(drift, Mapping):
    _same_groups(drift, groups, "drift")
    drift_of = {g: bool(drift.get(g, True)) for g in groups}
  elif isinstance(drift, (bool, np.bool_)):
    drift_of = {g: bool(drift) for g in groups}
  else:
    raise TypeError("drift must be a bool or a mapping {group: bool}, got "
                    f"{drift!r}.")
  scales = {} if scales is None else scales
  if not isinstance(scales, Mapping):
    raise TypeError("scales must be a mapping {group: factor} or None, got "
                    f"{scales!r}.")
  _same_groups(scales, groups, "scales")
  if schedule_steps is None:
    schedule_steps = "global" if shared else "group"
  if schedule_steps not in ("global", "group"):
    raise ValueError("schedule_steps must be 'global', 'group' or None, got "
                     f"{schedule_steps!r}.")

  rates = {}
  for g in groups:
    period, hold = period_of[g], drift_of[g] and period_of[g] > 1
    if g in scales:
      scale = real_number(scales[g], f"the scale of group {g!r}")
      per_period = scale * (period if hold else 1)
      if isinstance(per_period, numbers.Real) and per_period > 1:
        warnings.warn(
            f"the scale {scale:g} of group {g!r} moves it by {per_period:g} "
            f"updates of its optimizer per period of {period} steps, from one "
            "stale gradient; that diverged when training from scratch (see "
            "the README's rates section). For a larger step give the group's "
            "optimizer a larger rate and leave its scale at the default.",
            stacklevel=2)
    else:
      scale = 1.0 / period if hold else 1.0
    ungated = period == 1 and isinstance(scale, numbers.Real) and scale == 1
    rates[g] = Rate(optimizer_of[g], period=period, gated=not ungated,
                    scale=scale, hold=hold,
                    global_schedules=schedule_steps == "global")

  def labels_of(params) -> tuple[str, ...]:
    per_leaf = resolve_labels(labels, params, groups)
    empty = [g for g in groups if g not in per_leaf]
    if empty:
      paths = leaf_paths(params)
      raise ValueError(
          f"groups {empty} of periods have no parameters; every group of "
          f"{list(groups)} needs at least one (or drop it from periods). The "
          f"parameters' paths (what groups_by_path's patterns are searched "
          f"in) are {paths[:12]}" + (" ..." if len(paths) > 12 else "") + ".")
    return per_leaf

  return timetabled(timetable, labels=labels_of, groups=rate_groups(rates))


def _same_groups(mapping: Mapping[str, object], groups: tuple[str, ...],
                 name: str, every: bool = False) -> None:
  """Raises if ``mapping`` names a group not in ``groups`` (or, with
  ``every``, lacks one)."""
  unknown = sorted(set(mapping) - set(groups), key=str)
  if unknown:
    raise ValueError(
        f"{name} names groups {unknown} that periods does not have; the "
        f"groups are {list(groups)}.")
  missing = [g for g in groups if g not in mapping]
  if every and missing:
    raise ValueError(
        f"{name} has no entry for groups {missing}; give one for every group "
        f"of periods {list(groups)}, or one optimizer for all.")
