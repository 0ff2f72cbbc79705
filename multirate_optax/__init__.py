"""Multirate training for JAX/Optax.

Update different parts of a network at different rates, and do no backward
work for the parts that are not being updated on a step.
"""

from multirate_optax._groups import fast_by_depth, fast_by_path, path_str
from multirate_optax._multirate import SlowState, in_slow_steps, multirate
from multirate_optax._schedule import (
    MultirateSchedule, Schedule, ScheduleState, find_schedule_state)
from multirate_optax._train_step import TrainStep, resolve_dispatch, train_step

__version__ = "0.1.0"

__all__ = (
    "MultirateSchedule",
    "Schedule",
    "ScheduleState",
    "SlowState",
    "TrainStep",
    "fast_by_depth",
    "fast_by_path",
    "find_schedule_state",
    "in_slow_steps",
    "multirate",
    "path_str",
    "resolve_dispatch",
    "train_step",
)
