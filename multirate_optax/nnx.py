"""Multirate training of Flax NNX modules with ``nnx.Optimizer`` and filters.

The fast part is an nnx filter; :func:`fast_by_filter` turns it into the labels
of a :func:`multirate_optax.multirate` optimizer that goes into an
``nnx.Optimizer`` as usual. The optimizer's state then holds the schedule and
each parameter's group, and :func:`train_step` reads them to differentiate, on
each step, only the active parameters with
``nnx.grad(..., argnums=nnx.DiffState(0, active))``: on fast steps the slow
parameters are not differentiated, so no backward work is done for them.

As with Linen (see :mod:`multirate_optax.linen`), the forward pass runs in full
on every step: BatchNorm running statistics and rng streams advance on fast
steps too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from multirate_optax._gradients import _checked_loss, check_loss_signature
from multirate_optax._groups import FAST, SLOW
from multirate_optax._schedule import ScheduleState, find_schedule_state
from multirate_optax._train_step import Dispatch, HostCount, resolve_dispatch


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

  def labels(params: nnx.State) -> nnx.State:
    if not isinstance(params, nnx.State):
      raise TypeError(
          "fast_by_filter labels an nnx.State (what nnx.Optimizer passes to "
          f"its optimizer's init), got {type(params).__name__}.")
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
    return label_tree

  return labels


def _find_schedule_state(
    optimizer: nnx.Optimizer) -> tuple[ScheduleState, bool]:
  """:func:`multirate_optax.find_schedule_state` in ``optimizer``'s state."""
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        f"expected an nnx.Optimizer, got {type(optimizer).__name__}.")
  return find_schedule_state(optimizer.opt_state)


def _active_filter(model: nnx.Module, optimizer: nnx.Optimizer,
                   phase: int) -> nnx.filterlib.Filter:
  """The filter of the parameters that get gradients in ``phase``."""
  schedule_state, _ = _find_schedule_state(optimizer)
  params = nnx.state(model, optimizer.wrt)
  # One path per leaf, aligned with the labels (leaves of nnx.state order).
  paths = [
      tuple(key.key for key in path if isinstance(key, jax.tree_util.DictKey))
      for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if len(paths) != len(schedule_state.labels):
    raise ValueError(
        f"the model has {len(paths)} parameter leaves under the optimizer's "
        f"wrt={optimizer.wrt!r}, but the optimizer was built for "
        f"{len(schedule_state.labels)}: pass the model the optimizer was "
        "built for.")
  active = schedule_state.active(phase)
  if all(active):
    return optimizer.wrt
  return nnx.All(optimizer.wrt,
                 nnx.filterlib.PathIn(*(p for p, a in zip(paths, active) if a)))


class TrainStep:
  """A multirate train step on an ``nnx.Module`` and its ``nnx.Optimizer``.

  Call it as ``value = step(model, optimizer, *args)``; it updates ``model``
  and ``optimizer`` in place and returns what ``loss_fn(model, *args)``
  returns. Build it with :func:`train_step`.

  The phase comes from the count of the :func:`multirate_optax.multirate`
  state inside ``optimizer``, as in :class:`multirate_optax.TrainStep`:
  ``'cond'`` compiles one program that picks the phase with ``nnx.switch``;
  ``'host'`` compiles one program per phase, picked from a host-side copy of
  the count that is read from the device only on the first call and when the
  optimizer's count is not the one this step last left there.
  """

  def __init__(self, loss_fn: Callable[..., Any], *, has_aux: bool,
               dispatch: Dispatch, donate: bool):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._has_aux = has_aux
    self.dispatch = resolve_dispatch(dispatch)
    donate_argnums = (0, 1) if donate else ()
    self._cond_program = nnx.jit(self.apply, donate_argnums=donate_argnums)
    self._phase_program = nnx.jit(
        self.apply_phase, static_argnums=0,
        donate_argnums=tuple(i + 1 for i in donate_argnums))
    self._host_count = HostCount()

  def apply_phase(self, phase: int, model: nnx.Module,
                  optimizer: nnx.Optimizer, *args):
    """The uncompiled step of one phase (``phase`` is a static int)."""
    check_loss_signature(self._loss_fn, len(args))
    active = _active_filter(model, optimizer, phase)
    value, grads = nnx.value_and_grad(
        _checked_loss(self._loss_fn, self._has_aux),
        argnums=nnx.DiffState(0, active), has_aux=self._has_aux)(model, *args)
    # nnx.Optimizer.update wants a gradient for every parameter it tracks.
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, optimizer.wrt))
    optimizer.update(model, nnx.merge_state(zeros, grads))
    return value

  def apply(self, model: nnx.Module, optimizer: nnx.Optimizer, *args):
    """The uncompiled step, choosing the phase with ``nnx.switch``.

    Use it inside your own ``nnx.jit``.
    """
    schedule_state, _ = _find_schedule_state(optimizer)
    schedule = schedule_state.schedule
    branches = [functools.partial(self.apply_phase, phase)
                for phase in range(len(schedule.phases))]
    return nnx.switch(schedule.phase(schedule_state.count.get_value()),
                      branches, model, optimizer, *args)

  def program(self, model: nnx.Module, optimizer: nnx.Optimizer, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    Args:
      model, optimizer, *args: as for a call.
      phase: the phase whose ``'host'`` program to return; ``None`` returns
        the single ``nnx.switch`` program of ``'cond'``.
    """
    if phase is None:
      return self._cond_program.lower(model, optimizer, *args)
    return self._phase_program.lower(phase, model, optimizer, *args)

  def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer, *args):
    if self.dispatch == "cond":
      return self._cond_program(model, optimizer, *args)
    schedule_state, inside_skipping = _find_schedule_state(optimizer)
    phase = self._host_count.phase(schedule_state.schedule,
                                   schedule_state.count.get_value(),
                                   inside_skipping)
    value = self._phase_program(phase, model, optimizer, *args)
    self._host_count.advance(
        _find_schedule_state(optimizer)[0].count.get_value())
    return value


def train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = True,
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
    donate: donate the model's and optimizer's buffers to the step.

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
