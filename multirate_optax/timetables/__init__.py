"""The timetabled methods: which groups train when, as optax transformations.

* Multirate (Vlaar & Leimkuhler, 2022): fast groups every step, slow groups
  every ``period`` steps; with any number of groups, each on its own period.
* FreezeOut (Brock et al., 2017): per-layer cosine rates, layers frozen in
  order.
* Random subgroups: multirate with a random elementwise slow subset, redrawn
  every cycle.
* Gradual unfreezing (Howard & Ruder, 2018): groups join training top-down,
  with discriminative rates and a schedule restarted at each unfreezing.

Each is a :class:`~multirate_optax.Timetable` and a transformation built on
:mod:`multirate_optax.core`; the train steps read the timetable from the
optimizer's state to differentiate the active leaves only.
"""

from multirate_optax.timetables._freezeout import (
    FreezeOutTimetable, freezeout, keep_frozen, layers_by_module)
from multirate_optax.timetables._multirate import (
    MultirateTimetable, in_slow_steps, multirate)
from multirate_optax.timetables._multirate_groups import (
    MultirateGroupsTimetable, multirate_groups)
from multirate_optax.timetables._random_subgroups import (
    RandomSubgroupsState, RandomSubgroupsTimetable, full_weights,
    random_subgroups, random_subgroups_state)
from multirate_optax.timetables._unfreezing import (
    gradual_unfreezing, UnfreezingTimetable)

__all__ = (
    "freezeout",
    "FreezeOutTimetable",
    "full_weights",
    "gradual_unfreezing",
    "in_slow_steps",
    "keep_frozen",
    "layers_by_module",
    "multirate",
    "multirate_groups",
    "MultirateGroupsTimetable",
    "MultirateTimetable",
    "random_subgroups",
    "random_subgroups_state",
    "RandomSubgroupsState",
    "RandomSubgroupsTimetable",
    "UnfreezingTimetable",
)
