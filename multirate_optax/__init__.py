"""Multirate training for JAX/Optax.

Update different parts of a network at different rates, and do no backward
work for the parts that are not being updated on a step. The Flax and
Equinox adapters, :mod:`multirate_optax.linen`, :mod:`multirate_optax.nnx`
and :mod:`multirate_optax.equinox`, are imported on first use, so importing
this package imports neither Flax nor Equinox.
"""

import importlib
from typing import Any

from multirate_optax import (
    budgeted, core, growth, profiling, timetables, transforms)
from multirate_optax.core import (
    fast_by_depth, fast_by_path, find_timetable_state, GateState,
    groups_by_path, path_str,
    resolve_dispatch, Timetable, TimetableState, train_step, TrainStep)
from multirate_optax.growth import (
    describe_widths, element_stages, grow, grow_optimizer_state, Growth,
    growth_plan, GrowthPlan, Layer, scale_by_stage_norms, stage_norm_factors)
from multirate_optax.profiling import (
    CostEstimate, estimate_saving, predicted_speedup, profile_splits,
    SplitsProfile)
from multirate_optax.transforms import (
    depths_by_module, depths_by_path, layerwise_decay)
from multirate_optax.timetables import (
    freezeout, FreezeOutTimetable, full_weights, gradual_unfreezing,
    in_slow_steps, keep_frozen, layers_by_module, multirate, multirate_groups,
    MultirateGroupsTimetable, MultirateTimetable, random_subgroups, random_subgroups_state,
    RandomSubgroupsState, RandomSubgroupsTimetable, UnfreezingTimetable)

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("checkpoint", "equinox", "linen", "nnx")

__all__ = (
    "budgeted",
    "core",
    "growth",
    "profiling",
    "timetables",
    "transforms",
    "CostEstimate",
    "depths_by_module",
    "depths_by_path",
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
    "gradual_unfreezing",
    "grow",
    "grow_optimizer_state",
    "groups_by_path",
    "Growth",
    "growth_plan",
    "GrowthPlan",
    "in_slow_steps",
    "keep_frozen",
    "Layer",
    "layers_by_module",
    "layerwise_decay",
    "multirate",
    "multirate_groups",
    "MultirateGroupsTimetable",
    "MultirateTimetable",
    "path_str",
    "predicted_speedup",
    "profile_splits",
    "random_subgroups",
    "random_subgroups_state",
    "RandomSubgroupsState",
    "RandomSubgroupsTimetable",
    "resolve_dispatch",
    "scale_by_stage_norms",
    "SplitsProfile",
    "stage_norm_factors",
    "Timetable",
    "TimetableState",
    "train_step",
    "TrainStep",
    "UnfreezingTimetable",
) + _LAZY_SUBMODULES


def __getattr__(name: str) -> Any:
  # Flax, Equinox and orbax load only when their adapters are first used.
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))
