"""The core mechanism: which parameters get gradients on each step.

* :mod:`~multirate_optax.core._groups`: parameter groups, labels of leaves.
* :mod:`~multirate_optax.core._timetable`: timetables of active groups, and the
  count kept in an optimizer's state.
* :mod:`~multirate_optax.core._timetabled`: building blocks of a
  transformation that follows a timetable (gates per group and phase).
* :mod:`~multirate_optax.core._gradients`: gradients of the active leaves only.
* :mod:`~multirate_optax.core._dispatch`: how a step picks its phase,
  ``'cond'`` (one program) or ``'host'`` (one program per phase).
* :mod:`~multirate_optax.core._train_step`: the compiled train step.

Every method of the library (:mod:`multirate_optax.timetables`,
:mod:`multirate_optax.budgeted`) is a timetable on this mechanism, and every
adapter (:mod:`multirate_optax.linen`, :mod:`multirate_optax.nnx`) runs it.
"""

from multirate_optax.core._dispatch import resolve_dispatch
from multirate_optax.core._groups import (
    fast_by_depth, fast_by_path, groups_by_path, path_str)
from multirate_optax.core._timetable import (
    Timetable, TimetableState, find_timetable_state)
from multirate_optax.core._timetabled import GateState
from multirate_optax.core._train_step import TrainStep, train_step

__all__ = (
    "fast_by_depth",
    "fast_by_path",
    "find_timetable_state",
    "GateState",
    "groups_by_path",
    "path_str",
    "resolve_dispatch",
    "Timetable",
    "TimetableState",
    "train_step",
    "TrainStep",
)
