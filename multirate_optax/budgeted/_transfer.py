"""Training the selected layers' changes only, with no backward work for the rest.

Once the layers to adapt are chosen, the other layers' changes ``dW_l`` must
stay exactly zero, and a train step should not compute their gradients at
all. :func:`transfer` says so with the library's one mechanism for it: a
timetable (:func:`~multirate_optax.core._timetabled.timetabled`) whose single
phase, for ever, has the selected changes (and whatever else you name)
active and every other leaf inactive. :func:`multirate_optax.train_step`
then differentiates only the active leaves, closing over the others as
constants, so autodiff builds no weight gradient for an unselected layer and
no backpropagation below the lowest selected one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax.core._gradients import describe
from multirate_optax.core._groups import leaf_paths
from multirate_optax.budgeted._reparametrized import check_layers_in
from multirate_optax.core._timetable import Step, Timetable
from multirate_optax.core._timetabled import timetabled

PyTree = Any

DELTAS = "deltas"
TRAINED = "trained"
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class TransferTimetable(Timetable):
  """One phase for ever: the ``'trained'`` group active, ``'frozen'`` never.

  The timetable of :func:`transfer`, whose labels put the selected layers'
  changes (and ``also_train``'s leaves) in ``'trained'``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> from multirate_optax import budgeted
    >>> base = {'body': {'kernel': jnp.ones((2, 2))}, 'head': {'kernel': jnp.ones((2, 1))}}
    >>> deltas = budgeted.init_deltas(base, budgeted.candidate_layers(base))
    >>> tx = budgeted.transfer(['head/kernel'], optax.sgd(0.1), deltas)
    >>> state = mo.find_timetable_state(tx.init({'deltas': deltas}))
    >>> state.timetable, state.timetable.phase(1000)
    (TransferTimetable(), 0)
    >>> state.labels, state.active(0)  # body/kernel, head/kernel
    (('frozen', 'trained'), (False, True))
  """

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return (frozenset({TRAINED}),)

  def phase(self, step: Step) -> Step:
    if isinstance(step, (int, np.integer)):
      return 0
    return jnp.zeros([], jnp.int32)


def transfer(
    selection: Iterable[str],
    optimizer: optax.GradientTransformation,
    deltas: Mapping[str, Any],
    *,
    also_train: Union[None, str, Callable[[str], bool]] = None,
) -> optax.GradientTransformationExtraArgs:
  """An optimizer that trains the changes of the selected layers only.

  It updates a tree of trainable parameters ``{'deltas': {layer: dW_l},
  ...}``: the changes of the layers in ``selection`` with ``optimizer``, and
  the leaves whose path matches ``also_train`` (a new classifier head, say)
  with it too; every other leaf gets exactly zero update, so the unselected
  changes stay zero. With :func:`multirate_optax.train_step` no gradient is
  computed for those leaves (nor backpropagated below the lowest trained
  layer). ``loss_fn`` may build the weights with :func:`apply_deltas` (any
  gates) or :func:`merge`; afterwards :func:`merge` with ``selection`` gives
  the adapted model.

  Args:
    selection: the layers to train, e.g. from :func:`select_within_budget`.
    optimizer: the optimizer of the trained leaves (weight decay included:
      anything chained outside this transformation also moves the others).
    deltas: the changes ``{layer: dW_l}`` (the ``'deltas'`` entry of the
      trainable tree); every selected layer must be one of them.
    also_train: a regular expression searched for in the path of each
      trainable leaf outside ``'deltas'`` (e.g. ``'^head/'``), or a predicate
      on the path; those leaves train on every step too.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`~multirate_optax.TimetableState` with a :class:`TransferTimetable`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> from multirate_optax import budgeted
    >>> base = {'body': {'kernel': jnp.ones((2, 2))}, 'top': {'kernel': jnp.ones((2, 1))}}
    >>> deltas = budgeted.init_deltas(base, budgeted.candidate_layers(base))
    >>> gates = dict.fromkeys(deltas, 1.0)
    >>> def loss_fn(trainable, x):
    ...   p = budgeted.apply_deltas(base, trainable['deltas'], gates)
    ...   return jnp.sum(x @ p['body']['kernel'] @ p['top']['kernel'])
    >>> tx = budgeted.transfer(['top/kernel'], optax.sgd(0.5), deltas)
    >>> step = mo.train_step(loss_fn, tx)
    >>> trainable = {'deltas': deltas}
    >>> opt_state = tx.init(trainable)
    >>> trainable, opt_state, loss = step(trainable, opt_state, jnp.ones((1, 2)))
    >>> trainable['deltas']['top/kernel'].tolist(), trainable['deltas']['body/kernel'].tolist()
    ([[-1.0], [-1.0]], [[0.0, 0.0], [0.0, 0.0]])
  """
  selection = tuple(selection)
  check_layers_in(selection, deltas, "the changes (deltas)")
  trained_paths = {f"{DELTAS}/{layer}" for layer in selection}
  other = _predicate(also_train)
  timetable = TransferTimetable()

  def labels(tree: PyTree) -> tuple[str, ...]:
    if not isinstance(tree, Mapping) or DELTAS not in tree:
      raise ValueError(
          "transfer trains a tree {'deltas': {layer: dW_l}, ...}; got "
          f"{describe(tree)}. Put the changes from init_deltas under "
          "'deltas'.")
    check_layers_in(selection, tree[DELTAS], "the trainable tree's 'deltas'")
    per_leaf = tuple(
        TRAINED if path in trained_paths or (
            other is not None and not path.startswith(DELTAS + "/")
            and other(path)) else FROZEN
        for path in leaf_paths(tree))
    if TRAINED not in per_leaf:
      raise ValueError(
          "transfer would train nothing: the selection is empty and "
          f"also_train={also_train!r} matches no leaf of {leaf_paths(tree)}.")
    return per_leaf

  def groups(count, active):
    del count, active  # One phase, the same groups at every step.
    return {TRAINED: optimizer, FROZEN: optax.set_to_zero()}

  return timetabled(timetable, labels=labels, groups=groups)


def _predicate(also_train: Union[None, str, Callable[[str], bool]]
               ) -> Optional[Callable[[str], bool]]:
  if also_train is None or callable(also_train):
    return also_train
  pattern = re.compile(also_train)
  return lambda path: pattern.search(path) is not None
