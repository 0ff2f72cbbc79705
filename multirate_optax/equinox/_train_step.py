"""The Equinox train step: a whole ``eqx.Module`` in, the core step inside."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import equinox as eqx
import jax
import optax

from multirate_optax.core._dispatch import Dispatch
from multirate_optax.core._gradients import check_loss_signature
from multirate_optax.core._timetable import find_timetable_state
from multirate_optax.core._train_step import TrainStep as CoreTrainStep

PyTree = Any


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
  """The non-array leaves of the model and arguments, and where they go.

  A pytree node without children: the jitted program sees it in its input
  structure, so a new value (another activation, ``inference=True``) compiles
  a new program, as with ``eqx.filter_jit``, and an equal one reuses it.
  """

  leaves: tuple[Any, ...]
  treedef: jax.tree_util.PyTreeDef


def _split_arrays(tree: PyTree) -> tuple[list[Any], _Static]:
  """The array leaves of ``tree`` (``None`` elsewhere), and the rest."""
  leaves, treedef = jax.tree.flatten(tree)
  arrays = [leaf if eqx.is_array(leaf) else None for leaf in leaves]
  static = tuple(None if eqx.is_array(leaf) else leaf for leaf in leaves)
  return arrays, _Static(static, treedef)


def _join_arrays(arrays: list[Any], static: _Static) -> PyTree:
  return static.treedef.unflatten(
      [a if s is None else s for a, s in zip(arrays, static.leaves)])


class TrainStep:
  """A multirate train step on a whole Equinox model.

  Call it as ``model, opt_state, value = step(model, opt_state, *args)``,
  where ``value`` is what ``loss_fn(model, *args)`` returns. Build it with
  :func:`train_step`.

  The model is split as ``eqx.filter_jit`` and ``eqx.filter_grad`` split it:
  its parameters (the leaves ``filter_spec`` selects, floating-point arrays
  by default) are the core :class:`multirate_optax.TrainStep`'s parameters,
  differentiated on the steps whose phase has them active and updated by the
  optimizer; its other arrays are traced arguments, never differentiated;
  everything else (functions, Python numbers, ``inference`` flags) is static
  data of the compiled program, so a change to it compiles a new program and
  an equal value reuses the old one. The arguments after ``opt_state`` are
  split the same way. The phase dispatch, compilation and refusals are the
  core step's.

  Example:
    Called on its own, and its :meth:`apply` under an ``eqx.filter_jit`` of
    your own, which follow the same timetable:

    >>> import equinox as eqx, jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> model = eqx.nn.MLP(3, 1, width_size=8, depth=2, key=jax.random.key(0))
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> tx = mo.multirate(optax.sgd(0.01), period=2,
    ...                   labels=mo.equinox.fast_by_where(lambda m: m.layers[-1]))
    >>> step = mo.equinox.train_step(loss_fn, tx, dispatch='cond')
    >>> jitted = eqx.filter_jit(step.apply)
    >>> a = b = model
    >>> sa = sb = tx.init(eqx.filter(model, eqx.is_inexact_array))
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(3):
    ...   a, sa, loss_a = step(a, sa, x, y)
    ...   b, sb, loss_b = jitted(b, sb, x, y)
    >>> step.dispatch, int(sa.count), int(sb.count)
    ('cond', 3, 3)
    >>> bool(jnp.allclose(loss_a, loss_b)
    ...      & jnp.allclose(a.layers[0].weight, b.layers[0].weight))
    True
  """

  def __init__(self, loss_fn: Callable[..., Any],
               optimizer: optax.GradientTransformation, *, has_aux: bool,
               filter_spec: PyTree, dispatch: Dispatch, donate: bool):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._filter_spec = filter_spec
    self._core = CoreTrainStep(self._loss_of_parts, optimizer,
                               has_aux=has_aux, dispatch=dispatch,
                               donate=donate)
    self.dispatch = self._core.dispatch

  def _loss_of_parts(self, params: PyTree, arrays: list[Any],
                     static: _Static) -> Any:
    """The user's loss on the model and arguments put back together."""
    rest, args = _join_arrays(arrays, static)
    check_loss_signature(self._loss_fn, len(args))
    return self._loss_fn(eqx.combine(params, rest), *args)

  def _parts(self, model: PyTree, opt_state: PyTree, args: tuple[Any, ...]):
    """The core step's arguments: parameters, state, other arrays, static."""
    if not isinstance(model, eqx.Module):
      raise TypeError(
          "mo.equinox.train_step expects an eqx.Module as its first argument, "
          f"got {type(model).__name__}; for a plain pytree of arrays use "
          "mo.train_step.")
    params, rest = eqx.partition(model, self._filter_spec)
    labels = find_timetable_state(opt_state).labels
    found = len(jax.tree.leaves(params))
    if found != len(labels):
      raise ValueError(
          f"the model has {found} parameter leaves (selected by filter_spec="
          f"{self._filter_spec!r}), but the optimizer state was made for "
          f"{len(labels)}: initialise the optimizer with "
          "optimizer.init(eqx.filter(model, filter_spec)), the filter_spec "
          "given to the step (eqx.is_inexact_array by default).")
    arrays, static = _split_arrays((rest, args))
    return (params, opt_state, arrays, static), rest

  def __call__(self, model: PyTree, opt_state: PyTree, *args):
    parts, rest = self._parts(model, opt_state, args)
    params, opt_state, value = self._core(*parts)
    return eqx.combine(params, rest), opt_state, value

  def apply(self, model: PyTree, opt_state: PyTree, *args):
    """The uncompiled step, choosing the phase with ``jax.lax.switch``.

    Pure and traceable: use it inside your own ``eqx.filter_jit``,
    ``jax.jit`` or ``lax.scan``.
    """
    parts, rest = self._parts(model, opt_state, args)
    params, opt_state, value = self._core.apply(*parts)
    return eqx.combine(params, rest), opt_state, value

  def program(self, model: PyTree, opt_state: PyTree, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    See :meth:`multirate_optax.TrainStep.program`.
    """
    parts, _ = self._parts(model, opt_state, args)
    return self._core.program(*parts, phase=phase)


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    filter_spec: PyTree = eqx.is_inexact_array,
    dispatch: Dispatch = "auto",
    donate: bool = False,
) -> TrainStep:
  """Builds a multirate train step that takes a whole Equinox model.

  The model goes in whole, with its static fields, as with
  ``eqx.filter_jit``; the optimizer is initialised as Equinox users do,
  ``optimizer.init(eqx.filter(model, eqx.is_inexact_array))``, with labels
  from :func:`fast_by_where`, :func:`fast_by_filter` or
  :func:`multirate_optax.fast_by_path` (paths such as ``head/weight``). On a
  slow step every parameter gets a gradient; on a fast step only the fast
  ones, the rest being closed over as constants, so no backward work is done
  for them.

  Stateful layers (``eqx.nn.BatchNorm`` with ``eqx.nn.State``): pass the state
  after ``opt_state`` and return the new one, as in Equinox's own examples:
  ``loss_fn(model, state, x, y) -> (loss, new_state)`` with
  ``has_aux=True``; the step returns it in ``value``, on fast and slow steps
  alike (the forward pass runs in full on every step).

  Args:
    loss_fn: ``loss_fn(model, *args) -> loss``, or ``(loss, aux)`` with
      ``has_aux=True``.
    optimizer: the optimizer, containing one
      :func:`multirate_optax.multirate` (or another timetable).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    filter_spec: which leaves of the model are parameters, as for
      ``eqx.filter``; the optimizer must be initialised with
      ``eqx.filter(model, filter_spec)``.
    dispatch: ``'cond'``, ``'host'`` or ``'auto'``, as in
      :func:`multirate_optax.train_step`.
    donate: donate the parameter and optimizer-state buffers to the step, to
      save memory: the model's parameters and the state passed in are then
      consumed, so keep using the ones it returns. ``False`` (the default)
      keeps every earlier model and state usable.

  Returns:
    A :class:`TrainStep`: ``model, opt_state, value = step(model, opt_state,
    *args)``.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> model = eqx.nn.MLP(3, 1, width_size=8, depth=2, key=jax.random.key(0))
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> tx = mo.multirate(optax.sgd(0.01), period=4,
    ...                   labels=mo.equinox.fast_by_where(lambda m: m.layers[-1]))
    >>> opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    >>> step = mo.equinox.train_step(loss_fn, tx)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(8):
    ...   model, opt_state, loss = step(model, opt_state, x, y)
    >>> int(opt_state.count), model.activation is jax.nn.relu
    (8, True)
  """
  return TrainStep(loss_fn, optimizer, has_aux=has_aux,
                   filter_spec=filter_spec, dispatch=dispatch, donate=donate)
