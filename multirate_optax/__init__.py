"""Multirate training for JAX/Optax.

Update different parts of a network at different rates, and do no backward
work for the parts that are not being updated on a step.
"""

from multirate_optax._cost import CostEstimate, estimate_saving
from multirate_optax._freezeout import (
    FreezeOutSchedule, freezeout, keep_frozen, layers_by_module)
from multirate_optax._groups import fast_by_depth, fast_by_path, path_str
from multirate_optax._random_subgroups import (
    RandomSubgroupsSchedule, RandomSubgroupsState, full_weights,
    random_subgroups)
from multirate_optax._multirate import SlowState, in_slow_steps, multirate
from multirate_optax._schedule import (
    MultirateSchedule, Schedule, ScheduleState, find_schedule_state)
from multirate_optax._train_step import TrainStep, resolve_dispatch, train_step
from multirate_optax import linen, nnx  # Flax Linen and NNX integrations.

__version__ = "0.1.0"

__all__ = (
    "CostEstimate",
    "estimate_saving",
    "fast_by_depth",
    "fast_by_path",
    "find_schedule_state",
    "freezeout",
    "FreezeOutSchedule",
    "full_weights",
    "in_slow_steps",
    "keep_frozen",
    "layers_by_module",
    "linen",
    "multirate",
    "MultirateSchedule",
    "nnx",
    "path_str",
    "random_subgroups",
    "RandomSubgroupsSchedule",
    "RandomSubgroupsState",
    "resolve_dispatch",
    "Schedule",
    "ScheduleState",
    "SlowState",
    "train_step",
    "TrainStep",
)
