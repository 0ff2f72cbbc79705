"""Checkpoint and resume of multirate training with orbax-checkpoint.

A checkpoint holds two orbax items: ``'state'``, the whole training state
pytree (parameters, optimizer state with its multirate count, mutable
collections, rng keys, ...) saved with ``StandardSave``, and ``'multirate'``,
JSON metadata naming the timetable (e.g. its period) and the group of every
parameter leaf. :func:`restore` compares that metadata with the state it
restores into and refuses a checkpoint written for another timetable or other
labels: orbax itself would restore such a checkpoint without complaint (the
same arrays under another period) or leave holes in it (other labels move
optimizer-state leaves between the fast and slow groups).

The phase of the next step is the multirate count in the optimizer state, so a
checkpoint taken at any step, in the middle of a cycle too, resumes exactly
where it stopped. ``'host'`` dispatch needs nothing more: a train step re-reads
its host-side count from any state it did not return itself, such as a
restored one.

:func:`save_transfer` and :func:`load_transfer` store the per-task artefact of
budgeted transfer (:mod:`multirate_optax.budgeted`): the selected layers'
changes only, to be merged into the shared backbone when loaded.

Example:
  >>> import tempfile
  >>> import jax.numpy as jnp, optax
  >>> import multirate_optax as mo
  >>> from multirate_optax import checkpoint
  >>> params = {'body': jnp.ones(3), 'head': jnp.ones(2)}
  >>> tx = mo.multirate(optax.sgd(0.1), labels={'body': 'slow', 'head': 'fast'},
  ...                   period=4)
  >>> state = {'params': params, 'opt_state': tx.init(params)}
  >>> directory = tempfile.mkdtemp()
  >>> checkpoint.save(directory, 3, state)
  True
  >>> restored = checkpoint.restore(directory, state)
  >>> int(mo.find_timetable_state(restored["opt_state"]).count)
  0
"""

from multirate_optax.checkpoint._orbax import (
    load_transfer, restore, save, save_transfer)

__all__ = (
    "load_transfer",
    "restore",
    "save",
    "save_transfer",
)
