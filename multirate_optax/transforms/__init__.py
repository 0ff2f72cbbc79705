"""Transformations of updates that compose with any optimizer and timetable.

* Layer-wise learning-rate decay: each leaf's updates times
  ``decay ** depth``, the head at depth 0.

These are plain optax transformations, not timetables: they change how far
the parameters move, not which of them receive gradients.
"""

from multirate_optax.transforms._layerwise_decay import (
    depths_by_module, depths_by_path, layerwise_decay)

__all__ = (
    "depths_by_module",
    "depths_by_path",
    "layerwise_decay",
)
