"""Multirate training of Equinox models, whole, as ``eqx.filter_jit`` takes them.

:func:`train_step` takes an ``eqx.Module`` with its static fields and splits it
as ``eqx.partition`` does: the floating-point arrays are the parameters of the
core :class:`multirate_optax.TrainStep`, which differentiates, on each step,
only those of the active groups (the inactive ones are closed over as
constants, as ``eqx.filter_grad`` closes over what it does not differentiate),
and the rest rides along, arrays as traced arguments and everything else as
static data of the compiled program. The dispatch (``'cond'``/``'host'``),
compilation and refusals are the core's.

The fast part is named the Equinox way, by a ``where`` function
(:func:`fast_by_where`, ``lambda m: m.head``) or a filter
(:func:`fast_by_filter`), or by path with
:func:`multirate_optax.fast_by_path` (``'^head/'``).

Stateful layers: ``eqx.nn.State`` goes in as an argument and comes back in the
loss's aux, as in Equinox's own examples. The forward pass runs in full on
every step, so ``eqx.nn.BatchNorm`` statistics move on fast steps too, as they
do under :mod:`multirate_optax.linen` and :mod:`multirate_optax.nnx`.
"""

from multirate_optax.equinox._labels import fast_by_filter, fast_by_where
from multirate_optax.equinox._train_step import train_step, TrainStep

__all__ = (
    "fast_by_filter",
    "fast_by_where",
    "train_step",
    "TrainStep",
)
