"""When a growing network grows, and to which widths.

Yuan, Savarese & Maire (NeurIPS 2023) start at a quarter of the final width
and grow every width by a fraction ``p_c`` (0.2) of its current size per
stage, about eight growths; stage ``t`` lasts ``T_t = T_{t-1} + round(p_T
T_{t-1})`` steps (``p_T = p_c``, or 0 for stages of equal length) and the last
stage takes the steps that remain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from multirate_optax.core._checks import real_number, whole_number


@dataclasses.dataclass(frozen=True)
class GrowthPlan:
  """The widths and lengths of the stages of a growing network's training.

  Attributes:
    widths: for each stage, ``{width: size}``; the last stage has the final
      widths.
    starts: the step at which each stage starts (``starts[0] == 0``).
    total_steps: the length of the run.

  Example:
    >>> import multirate_optax as mo
    >>> plan = mo.growth_plan({'hidden': 64}, 1000, first_stage_steps=50)
    >>> plan.starts[:4], plan.lengths[:4]
    ((0, 50, 110, 182), (50, 60, 72, 86))
    >>> [plan.stage_at(step) for step in (0, 49, 50, 110, 999)]
    [0, 0, 1, 2, 8]
    >>> plan.widths[plan.stage_at(110)], plan.widths[-1]
    ({'hidden': 23}, {'hidden': 64})
  """

  widths: tuple[Mapping[str, int], ...]
  starts: tuple[int, ...]
  total_steps: int

  @property
  def lengths(self) -> tuple[int, ...]:
    """The number of steps of each stage."""
    ends = self.starts[1:] + (self.total_steps,)
    return tuple(e - s for s, e in zip(self.starts, ends))

  def stage_at(self, step: int) -> int:
    """The stage that step ``step`` (from 0) belongs to."""
    return sum(start <= step for start in self.starts) - 1


def growth_plan(
    final_widths: Mapping[str, int],
    total_steps: int,
    *,
    first_stage_steps: int,
    start_fraction: float = 0.25,
    width_rate: float = 0.2,
    length_rate: float = 0.2,
    multiple_of: int = 1,
) -> GrowthPlan:
  """Plans a growth from ``start_fraction`` of the final widths to them.

  Widths: ``C_0 = round(start_fraction * C_final)`` (at least 1), then
  ``C_t = C_{t-1} + round(width_rate * C_{t-1})`` (at least one unit more),
  capped at ``C_final``; every width grows at every stage until all reach their
  final size. With ``multiple_of`` each size is rounded up to a multiple of it
  (still capped at ``C_final``): XLA:CPU runs convolutions over channel counts
  that are not multiples of 8 much slower than their flops suggest. Stage lengths: ``T_0 = first_stage_steps``, ``T_t = T_{t-1} +
  round(length_rate * T_{t-1})`` (``length_rate=0``: stages of equal length),
  and the last stage takes the steps that remain.

  Args:
    final_widths: ``{width: final size}`` of the widths that grow.
    total_steps: the length of the run.
    first_stage_steps: ``T_0``.
    start_fraction: ``C_0 / C_final``, in ``(0, 1]``.
    width_rate: ``p_c``, the growth of a width per stage, ``> 0``.
    length_rate: ``p_T``, the growth of a stage's length per stage, ``>= 0``.
    multiple_of: round every size up to a multiple of this.

  Raises:
    ValueError: if the stages before the last do not leave it at least one
      step.

  Example:
    >>> import multirate_optax as mo
    >>> plan = mo.growth_plan({'hidden': 64}, 1000, first_stage_steps=50)
    >>> [w['hidden'] for w in plan.widths]
    [16, 19, 23, 28, 34, 41, 49, 59, 64]
    >>> plan.lengths
    (50, 60, 72, 86, 103, 124, 149, 179, 177)
  """
  total_steps = whole_number(total_steps, "total_steps")
  first = whole_number(first_stage_steps, "first_stage_steps")
  for name, value, low in (("start_fraction", start_fraction, 0.0),
                           ("width_rate", width_rate, 0.0)):
    if not real_number(value, name) > low:
      raise ValueError(f"{name} must be > {low}, got {value!r}.")
  if not start_fraction <= 1.0:
    raise ValueError(f"start_fraction must be <= 1, got {start_fraction!r}.")
  if not real_number(length_rate, "length_rate") >= 0.0:
    raise ValueError(f"length_rate must be >= 0, got {length_rate!r}.")
  final = {name: whole_number(size, f"the final size of width {name!r}")
           for name, size in final_widths.items()}
  multiple_of = whole_number(multiple_of, "multiple_of")

  def rounded(name: str, size: int) -> int:
    return min(final[name], -(-size // multiple_of) * multiple_of)

  widths = [{name: rounded(name, max(1, round(start_fraction * size)))
             for name, size in final.items()}]
  while widths[-1] != final:
    widths.append({
        name: rounded(name, size + max(1, round(width_rate * size)))
        for name, size in widths[-1].items()})
  starts, length = [0], first
  for _ in widths[1:]:
    starts.append(starts[-1] + length)
    length += round(length_rate * length)
  if starts[-1] >= total_steps:
    raise ValueError(
        f"{len(widths)} stages starting with {first} steps and growing by "
        f"{length_rate} need {starts[-1]} steps before the last stage, but "
        f"the run has {total_steps}: lower first_stage_steps or length_rate.")
  return GrowthPlan(tuple(widths), tuple(starts), total_steps)
