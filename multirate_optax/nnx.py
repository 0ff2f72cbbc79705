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
(``'cond'``/``'host'``), compilation and refusals are the core's.

As with Linen (see :mod:`multirate_optax.linen`), the forward pass runs in full
on every step: BatchNorm running statistics and rng streams advance on fast
steps too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import optax
from flax import nnx

from multirate_optax._dispatch import Dispatch, PhaseDispatch, resolve_dispatch
from multirate_optax._gradients import (
    checked_loss, check_loss_signature, value_and_active_grad)
from multirate_optax._groups import FAST, SLOW
from multirate_optax._nnx_jit import jit, value_and_grad
from multirate_optax._timetable import find_timetable_state


def fast_by_filter(
    fast: nnx.filterlib.Filter) -> Callable[[nnx.State], nnx.State]:
  """Labels the parameters that ``fast`` selects ``'fast'``, the rest ``'slow'``.

  Args:
    fast: an nnx filter on (path, variable), e.g. ``nnx.PathContains('head')``
      or ``nnx.All(nnx.Param, nnx.PathContains('head'))``.

  Returns:
    A labels function for :func:`multirate_optax.multirate`, applied by
    ``nnx.Optimizer`` to ``nnx.state(model, wrt)``.

  Raises:
    ValueError: when applied, if the filter selects no parameter.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import multirate_optax as mo
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Linear(3, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 2, rngs=rngs)
    >>> labels = mo.nnx.fast_by_filter(nnx.PathContains('head'))
    >>> nnx.to_pure_dict(labels(nnx.state(Net(nnx.Rngs(0)), nnx.Param)))
    {'body': {'bias': 'slow', 'kernel': 'slow'}, 'head': {'bias': 'fast', 'kernel': 'fast'}}
  """
  predicate = nnx.filterlib.to_predicate(fast)
  # Filters may test a variable's type, which a state of plain arrays (what
  # nnx.Optimizer passes to update) no longer has: the labels found on a
  # state of variables are kept, by parameter paths, for its plain twin.
  found: dict[tuple[Any, ...], nnx.State] = {}

  def labels(params: nnx.State) -> nnx.State:
    if not isinstance(params, nnx.State):
      raise TypeError(
          "fast_by_filter labels an nnx.State (what nnx.Optimizer passes to "
          f"its optimizer's init), got {type(params).__name__}.")
    flat = list(nnx.to_flat_state(params))
    paths = tuple(path for path, _ in flat)
    if not any(isinstance(v, nnx.Variable) for _, v in flat):
      if paths not in found:
        raise ValueError(
            "fast_by_filter was given a state of plain arrays before the "
            "state of variables with the same paths (nnx.state(model, wrt), "
            "as nnx.Optimizer passes to init): its filter may need the "
            "variables' types.")
      return found[paths]
    label_tree = nnx.map_state(
        lambda path, variable: FAST if predicate(path, variable) else SLOW,
        params)
    if FAST not in jax.tree.leaves(label_tree):
      paths = ["/".join(map(str, path))
               for path, _ in nnx.to_flat_state(params)]
      raise ValueError(
          f"the fast filter {fast!r} selects none of the {len(paths)} "
          f"parameters; their paths: {paths[:8]}"
          + (" ..." if len(paths) > 8 else "") + ".")
    found[paths] = nnx.map_state(lambda _, label: label, label_tree)
    return label_tree

  return labels


class TrainStep:
  """A multirate train step on an ``nnx.Module`` and its ``nnx.Optimizer``.

  Call it as ``value = step(model, optimizer, *args)``; it updates ``model``
  and ``optimizer`` in place and returns what ``loss_fn(model, *args)``
  returns. Build it with :func:`train_step`.

  The phase comes from the count of the timetable state inside
  ``optimizer``, as in :class:`multirate_optax.TrainStep`, with the same
  ``'cond'`` and ``'host'`` dispatch. One engine is kept per optimizer
  transformation (``optimizer.tx``), so compiled programs and the host-side
  count carry over from call to call.
  """

  def __init__(self, loss_fn: Callable[..., Any], *, has_aux: bool,
               dispatch: Dispatch, donate: bool):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._has_aux = has_aux
    self.dispatch = resolve_dispatch(dispatch)
    self._donate = donate
    self._dispatches: dict[tuple[Any, Any], PhaseDispatch] = {}

  def _engine(self, optimizer: nnx.Optimizer) -> PhaseDispatch:
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(
          f"expected an nnx.Optimizer, got {type(optimizer).__name__}.")
    key = (optimizer.tx, optimizer.wrt)
    if key not in self._dispatches:
      # Arguments: params, opt_state, graphdef, rest, count, *args; the
      # outputs keep params and opt_state in the first two places.
      self._dispatches[key] = PhaseDispatch(
          lambda phase, *pure: self._step_of_phase(*key, phase, *pure),
          state_argnum=1, dispatch=self.dispatch,
          donate_argnums=(0, 1, 3, 4) if self._donate else ())
    return self._dispatches[key]

  def _step_of_phase(self, tx: optax.GradientTransformation,
                     wrt: nnx.filterlib.Filter, phase: int,
                     params, opt_state, graphdef, rest, count, *args):
    """The pure step of one phase on the split model and optimizer."""
    check_loss_signature(self._loss_fn, len(args))
    user_loss = checked_loss(self._loss_fn, self._has_aux)

    def loss(params, rest, *args):
      model = nnx.merge(graphdef, params, rest)
      value = user_loss(model, *args)
      _, _, new_rest = nnx.split(model, wrt, ...)
      loss_value = value[0] if self._has_aux else value
      return loss_value, (value, new_rest)

    (_, (value, rest)), grads = value_and_active_grad(
        loss, find_timetable_state(opt_state).active(phase), has_aux=True)(
            params, rest, *args)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, rest, optax.safe_increment(count), value

  @staticmethod
  def _split(model: nnx.Module, optimizer: nnx.Optimizer):
    """The step's pure arguments, and the variables its outputs go back to.

    The variables are listed in the order of the leaves of the outputs
    ``(params, opt_state, rest, count)``, so that writing back is one
    ``set_value`` per leaf rather than a traversal of the module graph.
    """
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    parts = (params, optimizer.opt_state, rest, optimizer.step)
    # Variables that hold no array (optax.MaskedNode in a partitioned
    # optimizer state) have no leaf in the outputs.
    variables = [
        v for v in jax.tree.leaves(
            parts, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if jax.tree.leaves(v.get_value())]
    params, opt_state, rest, count = nnx.as_pure(parts)
    return (params, opt_state, graphdef, rest, count), variables

  @staticmethod
  def _write_back(variables, outputs):
    *parts, value = outputs
    for variable, new in zip(variables, jax.tree.leaves(parts), strict=True):
      variable.set_value(new)
    return value

  def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer, *args):
    engine = self._engine(optimizer)
    pure, variables = self._split(model, optimizer)
    return self._write_back(variables, engine(*pure, *args))

  def apply(self, model: nnx.Module, optimizer: nnx.Optimizer, *args):
    """The step choosing the phase with ``jax.lax.switch``, traceable.

    Use it inside your own ``nnx.jit`` (or ``jax.jit`` over split state).
    """
    engine = self._engine(optimizer)
    pure, variables = self._split(model, optimizer)
    return self._write_back(variables, engine.apply(*pure, *args))

  def program(self, model: nnx.Module, optimizer: nnx.Optimizer, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    Args:
      model, optimizer, *args: as for a call.
      phase: the phase whose ``'host'`` program to return; ``None`` returns
        the single ``lax.switch`` program of ``'cond'``.
    """
    pure, _ = self._split(model, optimizer)
    return self._engine(optimizer).program(*pure, *args, phase=phase)


def train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = False,
) -> TrainStep:
  """Builds a multirate train step for an ``nnx.Module`` and ``nnx.Optimizer``.

  The optimizer is ``nnx.Optimizer(model, tx, wrt=...)`` with ``tx`` containing
  one :func:`multirate_optax.multirate` (labels from :func:`fast_by_filter`,
  or any labels that fit ``nnx.state(model, wrt)``). On slow steps every
  parameter under ``wrt`` is differentiated, on fast steps only the fast ones;
  the optimizer sees zeros for the rest, which multirate ignores.

  Args:
    loss_fn: ``loss_fn(model, *args) -> loss`` or ``(loss, aux)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    dispatch: ``'cond'``, ``'host'`` or ``'auto'``, as in
      :func:`multirate_optax.train_step`.
    donate: donate the model's and optimizer's buffers to the step, to save
      memory: arrays read from the model and optimizer before the call (a
      state kept with ``nnx.state``, say) are then deleted. ``False`` (the
      default) keeps them usable.

  Returns:
    A :class:`TrainStep`: ``value = step(model, optimizer, *args)`` updates
    both in place. For your own ``nnx.jit`` use its ``apply`` method.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import multirate_optax as mo
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Linear(3, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.body(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> tx = mo.multirate(optax.sgd(0.01),
    ...                   labels=mo.nnx.fast_by_filter(nnx.PathContains('head')),
    ...                   period=4)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> step = mo.nnx.train_step(loss_fn)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(8):
    ...   loss = step(model, optimizer, x, y)
    >>> int(optimizer.step[...])
    8
  """
  return TrainStep(loss_fn, has_aux=has_aux, dispatch=dispatch, donate=donate)
