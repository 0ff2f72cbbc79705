"""Multirate training of Flax NNX modules with ``nnx.Optimizer`` and filters.

The fast part is an nnx filter; :func:`fast_by_filter` turns it into the labels
of a :func:`multirate_optax.multirate` optimizer that goes into an
``nnx.Optimizer`` as usual. The optimizer's state then holds the timetable and
each parameter's group, and :func:`train_step` reads them to differentiate, on
each step, only the active parameters: on fast steps the slow parameters are
not differentiated, so no backward work is done for them.

The step splits the model and optimizer into pure pytrees (``nnx.split``) and
runs the core step's engine on them under ``jax.jit``, as the Flax maintainers
recommend where speed matters, then writes the results back: the dispatch
(``'cond'``/``'host'``), compilation and refusals are the core's. The split is
kept from call to call (a call reads and writes the variables' values in a
flat loop) and made again when the model's or optimizer's structure changes.
Graph nodes among the step's other arguments (``nnx.Rngs``, metrics, other
modules) are split with the model and written back after the step, as
``nnx.jit`` does.

As with Linen (see :mod:`multirate_optax.linen`), the forward pass runs in full
on every step: BatchNorm running statistics and rng streams advance on fast
steps too.
"""

from multirate_optax.nnx._jit import (
    jit, value_and_grad)
from multirate_optax.nnx._train_step import (
    fast_by_filter, train_step, TrainStep)

__all__ = (
    "fast_by_filter",
    "jit",
    "train_step",
    "TrainStep",
    "value_and_grad",
)
