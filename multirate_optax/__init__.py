"""Multirate training for JAX/Optax.

Update different parts of a network at different rates, and do no backward
work for the parts that are not being updated on a step. The Flax adapters,
:mod:`multirate_optax.linen` and :mod:`multirate_optax.nnx`, are imported on
first use, so importing this package does not import Flax.
"""

import importlib
from typing import Any

from multirate_optax import budgeted
from multirate_optax._cost import CostEstimate, estimate_saving
from multirate_optax._dispatch import resolve_dispatch
from multirate_optax._freezeout import (
    FreezeOutTimetable, freezeout, keep_frozen, layers_by_module)
from multirate_optax._groups import fast_by_depth, fast_by_path, path_str
from multirate_optax._growth import (
    Growth, Layer, describe_widths, element_stages, grow)
from multirate_optax._growth_state import grow_optimizer_state
from multirate_optax._growth_plan import GrowthPlan, growth_plan
from multirate_optax._multirate import (
    MultirateTimetable, in_slow_steps, multirate)
from multirate_optax._random_subgroups import (
    RandomSubgroupsState, RandomSubgroupsTimetable, full_weights,
    random_subgroups, random_subgroups_state)
from multirate_optax._stage_rates import (
    scale_by_stage_norms, stage_norm_factors)
from multirate_optax._timetable import (
    Timetable, TimetableState, find_timetable_state)
from multirate_optax._timetabled import GateState
from multirate_optax._train_step import TrainStep, train_step

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("checkpoint", "linen", "nnx")

__all__ = (
    "budgeted",
    "CostEstimate",
    "describe_widths",
    "element_stages",
    "estimate_saving",
    "fast_by_depth",
    "fast_by_path",
    "find_timetable_state",
    "freezeout",
    "FreezeOutTimetable",
    "full_weights",
    "GateState",
    "grow",
    "grow_optimizer_state",
    "Growth",
    "growth_plan",
    "GrowthPlan",
    "in_slow_steps",
    "keep_frozen",
    "Layer",
    "layers_by_module",
    "multirate",
    "MultirateTimetable",
    "path_str",
    "random_subgroups",
    "random_subgroups_state",
    "RandomSubgroupsState",
    "RandomSubgroupsTimetable",
    "resolve_dispatch",
    "scale_by_stage_norms",
    "stage_norm_factors",
    "Timetable",
    "TimetableState",
    "train_step",
    "TrainStep",
) + _LAZY_SUBMODULES


def __getattr__(name: str) -> Any:
  # Flax and orbax load only when their adapters are first used.
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))
