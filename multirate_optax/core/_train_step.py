"""The compiled train step: gradients of the active parameters only."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from multirate_optax.core._dispatch import (
    Dispatch, PhaseDispatch, tracing_host_program)
from multirate_optax.core._gradients import (
    check_differentiable, check_loss_signature, value_and_active_grad)
from multirate_optax.core._timetable import (
    Timetable, TimetableState, find_timetable_state)

try:  # No public API lists the named axes bound by pmap, shard_map or vmap.
  from jax._src.core import get_axis_env as _axis_env
except ImportError:  # pragma: no cover - then the check below is skipped.
  _axis_env = None

PyTree = Any
AxisName = Union[str, tuple[str, ...], None]


def _check_averaged(axis_name: AxisName) -> None:
  """Refuses a step under a named axis that it would not average over.

  Under ``jax.pmap`` (or ``shard_map``) each replica would apply its own
  shard's gradient: the replicas drift apart with no error.
  """
  if axis_name is not None or _axis_env is None:
    return
  bound = [name for name in _axis_env().axis_sizes]
  if bound:
    shown = ["(unnamed pmap axis)" if name == "_internal_pmap_axis_name"
             else repr(name) for name in bound]
    raise ValueError(
        f"the train step is traced under the named axes {', '.join(shown)} "
        "(jax.pmap, shard_map or a named jax.vmap), but was built without "
        "axis_name: each replica would apply the gradient of its own shard "
        "and the replicas would drift apart. Give the axis a name "
        "(jax.pmap(..., axis_name='batch')) and build the step with "
        "axis_name='batch' to average the gradients over it; or drop pmap "
        "and shard the batch over a jax.sharding.Mesh, where jax.jit "
        "averages for you (docs/guides/multi_device.md). axis_name=() trains each "
        "member on its own gradient, on purpose.")


def _averaged_value_and_grad(axis_name: AxisName):
  """``jax.value_and_grad``, its gradients averaged over ``axis_name``."""
  if not axis_name:
    return jax.value_and_grad

  def value_and_grad(fun, has_aux):
    grad_fn = jax.value_and_grad(fun, has_aux=has_aux)

    def averaged(*args):
      value, grads = grad_fn(*args)
      return value, jax.lax.pmean(grads, axis_name)

    return averaged

  return value_and_grad


def _with_count_advanced(opt_state: PyTree) -> PyTree:
  """``opt_state`` with its timetable's count advanced and nothing else."""
  return jax.tree.map(
      lambda node: (dataclasses.replace(
          node, count=optax.safe_increment(node.count))
                    if isinstance(node, TimetableState) else node),
      opt_state, is_leaf=lambda node: isinstance(node, TimetableState))


def _warn_when_skipped(finite: jax.Array, timetable: Timetable, phase: int,
                       count: jax.Array) -> None:
  """Warns, from the device and only then, when a host program skips a step.

  A skipped step of 'host' dispatch still advances the count, so the groups
  active in this phase and not in every phase (multirate's slow group) miss
  this update; a callback in the branch that runs only on skipped steps says
  so without a device-to-host transfer on other steps.
  """
  missed = sorted(timetable.phases[phase]
                  - frozenset.intersection(*timetable.phases))
  if not missed:
    return

  def warn(count):
    warnings.warn(
        f"step {int(count)} had non-finite gradients and was skipped (the "
        "loss scale lowered). With 'host' dispatch the step count advances "
        f"on a skipped step, so the groups {missed} miss the update of this "
        "step until they are next active; build the step with "
        "dispatch='cond' to retry it with the next batch instead.",
        RuntimeWarning)

  jax.lax.cond(finite, lambda count: None,
               lambda count: jax.debug.callback(warn, count), count)


def loss_scaled_update(optimizer: optax.GradientTransformation,
                       loss_fn: Callable[..., Any], has_aux: bool, phase: int,
                       dynamic_scale: Any, params: PyTree, opt_state: PyTree,
                       *args, axis_name: AxisName = None):
  """One step of ``phase`` with Flax's ``DynamicScale``, traced.

  The scale scales the loss, unscales (and with ``axis_name`` averages) the
  gradients of the parameters active in ``phase`` and adapts itself; a step
  with non-finite gradients keeps the parameters and the optimizer state, as
  in Flax's examples: all of it under ``'cond'`` dispatch, all but the
  timetable's count (advanced, with a warning when a group misses its update)
  in a ``'host'`` program. Shared by the core, Linen and NNX steps.

  Returns:
    ``(params, opt_state, dynamic_scale, value)``, ``value`` what ``loss_fn``
    returns.
  """
  timetable_state = find_timetable_state(opt_state)
  dynamic_scale, finite, value, grads = value_and_active_grad(
      loss_fn, timetable_state.active(phase), has_aux,
      functools.partial(dynamic_scale.value_and_grad,
                        axis_name=axis_name or None))(params, *args)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  kept_opt_state = opt_state
  if tracing_host_program():
    kept_opt_state = _with_count_advanced(opt_state)
    _warn_when_skipped(finite, timetable_state.timetable, phase,
                       timetable_state.count)
  keep_if_skipped = functools.partial(
      jax.tree.map, functools.partial(jnp.where, finite))
  return (keep_if_skipped(optax.apply_updates(params, updates), params),
          keep_if_skipped(new_opt_state, kept_opt_state), dynamic_scale,
          value)


class TrainStep:
  """A jit-compiled train step that differentiates only the active parameters.

  Call it as ``params, opt_state, value = step(params, opt_state, *args)``,
  where ``value`` is what ``loss_fn(params, *args)`` returns (``loss``, or
  ``(loss, aux)`` with ``has_aux=True``). Build it with :func:`train_step`.

  The phase of a step comes from the count in the optimizer state's
  :class:`TimetableState`. With ``'cond'`` dispatch one program holds every
  phase and ``jax.lax.switch`` picks one on the device. With ``'host'``
  dispatch there is one program per phase met, picked from a host-side copy of
  the count: the copy is read from the device once, on the first call and
  whenever the state passed in is not the one this step last returned (a
  restored checkpoint, say), and then advanced on the host, with no
  device-to-host transfer per step.

  Built with ``dynamic_scale=True``, it is called as ``params, opt_state,
  dynamic_scale, value = step(params, opt_state, dynamic_scale, *args)`` with
  Flax's ``flax.training.dynamic_scale.DynamicScale``: see :func:`train_step`.

  Example:
    Called step by step, and its uncompiled :meth:`apply` inside a
    ``lax.scan`` of your own, which follow the same timetable:

    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones((3, 3)), 'head': jnp.ones((3, 1))}
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((jnp.tanh(x @ params['body']) @ params['head'] - y) ** 2)
    >>> tx = mo.multirate(optax.sgd(0.01), labels=mo.fast_by_path('head'), period=2)
    >>> step = mo.train_step(loss_fn, tx, dispatch='cond')
    >>> xs, ys = jnp.ones((4, 8, 3)), jnp.zeros((4, 8, 1))
    >>> p, s = params, tx.init(params)
    >>> for x, y in zip(xs, ys):
    ...   p, s, loss = step(p, s, x, y)
    >>> def scanned(carry, batch):
    ...   params, opt_state, loss = step.apply(*carry, *batch)
    ...   return (params, opt_state), loss
    >>> (q, r), losses = jax.lax.scan(scanned, (params, tx.init(params)), (xs, ys))
    >>> step.dispatch, int(s.count), int(r.count), losses.shape
    ('cond', 4, 4, (4,))
    >>> bool(jnp.allclose(p['body'], q['body']) & jnp.allclose(loss, losses[-1]))
    True
  """

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      optimizer: optax.GradientTransformation,
      *,
      has_aux: bool,
      dispatch: Dispatch,
      donate: bool,
      axis_name: AxisName = None,
      dynamic_scale: bool = False,
  ):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._optimizer = optimizer
    self._has_aux = has_aux
    self._axis_name = axis_name
    self._dynamic_scale = dynamic_scale
    self._dispatch = PhaseDispatch(
        self.apply_phase, state_argnum=1, dispatch=dispatch,
        donate_argnums=(0, 1) if donate else ())
    self.dispatch = self._dispatch.dispatch

  def apply_phase(self, phase: int, params: PyTree, opt_state: PyTree, *args):
    """The uncompiled step of one phase (``phase`` is a static int)."""
    if self._dynamic_scale:
      dynamic_scale, *args = args
    check_loss_signature(self._loss_fn, len(args))
    _check_averaged(self._axis_name)
    timetable_state = find_timetable_state(opt_state)
    active = timetable_state.active(phase)
    if not self._dynamic_scale:
      value, grads = value_and_active_grad(
          self._loss_fn, active, self._has_aux,
          _averaged_value_and_grad(self._axis_name))(params, *args)
      updates, opt_state = self._optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value
    return loss_scaled_update(
        self._optimizer, self._loss_fn, self._has_aux, phase, dynamic_scale,
        params, opt_state, *args, axis_name=self._axis_name)

  def apply(self, params: PyTree, opt_state: PyTree, *args):
    """The uncompiled step, choosing the phase with ``jax.lax.switch``.

    Pure and traceable: use it inside your own ``jax.jit`` or ``lax.scan``.
    """
    return self._dispatch.apply(params, opt_state, *args)

  def program(self, params: PyTree, opt_state: PyTree, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    Args:
      params, opt_state, args: as for a call (shapes and dtypes matter).
      phase: with ``'host'`` dispatch, the phase whose program to return;
        ``None`` returns the single ``lax.switch`` program of ``'cond'``.
    """
    with _naming_leaves_jit_refuses(params):
      return self._dispatch.program(params, opt_state, *args, phase=phase)

  def __call__(self, params: PyTree, opt_state: PyTree, *args):
    with _naming_leaves_jit_refuses(params):
      return self._dispatch(params, opt_state, *args)


@contextlib.contextmanager
def _naming_leaves_jit_refuses(params: PyTree) -> Iterator[None]:
  """Turns ``jax.jit``'s refusal of a leaf that is no array into a clear error.

  Float-less arrays are refused while the step is traced
  (:func:`check_differentiable` in the restricted gradient); a function or
  other object among the parameters stops ``jax.jit`` before that, with a
  message that names neither the leaf nor the fix. Checked only on failure,
  so a step costs nothing more.
  """
  try:
    yield
  except TypeError as e:
    check_differentiable(params)
    raise e


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = False,
    axis_name: AxisName = None,
    dynamic_scale: bool = False,
) -> TrainStep:
  """Builds a compiled train step that skips the backward pass of inactive groups.

  On a slow step every parameter gets a gradient; on a fast step only the fast
  parameters do, the slow ones being closed over as constants, so no backward
  work is done for them. The optimizer must contain exactly one timetable
  (:func:`multirate`, :func:`freezeout` or :func:`random_subgroups`), alone or
  inside ``optax.chain`` and other wrappers.

  Args:
    loss_fn: ``loss_fn(params, *args) -> loss`` or ``(loss, aux)``. ``args``
      are whatever the step is called with after the optimizer state: a batch,
      an rng, Flax mutable collections such as ``batch_stats`` (return their
      new values in ``aux``).
    optimizer: the optimizer, containing a :func:`multirate` transformation.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    dispatch: ``'cond'`` compiles one program and picks the branch on the
      device with ``jax.lax.switch`` (right for GPU/TPU and under
      ``lax.scan``); ``'host'`` compiles one program per phase and picks from
      a host-side counter, with no per-step device-to-host sync (needed on
      CPU, where XLA runs conv weight gradients inside a conditional on a slow
      path); ``'auto'`` (default) is ``'host'`` on CPU and ``'cond'``
      elsewhere.
    donate: donate the parameter and optimizer-state buffers to the step, to
      save memory: the arrays passed in are then consumed (deleted), so keep
      using the ones it returns; a consumed state passed again is refused with
      an error. ``False`` (the default) keeps every earlier state usable.
    axis_name: for a step inside ``jax.pmap`` (or ``shard_map``), the named
      axis to average the gradients over with ``jax.lax.pmean``, as Flax's
      examples do; the replicas then take the same step as one device on the
      whole batch. Needs ``dispatch='cond'`` (the host cannot pick a program
      per call under pmap). A step traced under a named axis without it is
      refused, rather than letting replicas drift apart; ``()`` trains each
      member on its own gradient. On a ``jax.sharding.Mesh`` with
      ``jax.jit``, leave it ``None``: the partitioner averages.
    dynamic_scale: take a Flax ``DynamicScale`` (loss scaling for float16)
      after the optimizer state and return the new one: ``params, opt_state,
      dynamic_scale, value = step(params, opt_state, dynamic_scale, *args)``.
      The loss is scaled, the gradients unscaled, and a step with non-finite
      gradients is skipped (parameters and optimizer state kept, the scale
      lowered), as ``DynamicScale`` and Flax's examples do. With ``'cond'``
      dispatch the whole optimizer state is kept, its count included, so the
      same phase is retried with the next batch (a skipped slow step is
      retried). With ``'host'`` dispatch the count advances on a skipped step
      (the host picks the next program without waiting for the device), so a
      skipped slow step's update is missed, and a warning says so when it
      happens. Finite steps follow the timetable exactly either way.

  Returns:
    A :class:`TrainStep`: ``params, opt_state, value = step(params, opt_state,
    *args)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones((3, 3)), 'head': jnp.ones((3, 1))}
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((jnp.tanh(x @ params['body']) @ params['head'] - y) ** 2)
    >>> tx = mo.multirate(optax.sgd(0.01), labels=mo.fast_by_path('head'), period=4)
    >>> step = mo.train_step(loss_fn, tx)
    >>> opt_state = tx.init(params)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(8):
    ...   params, opt_state, loss = step(params, opt_state, x, y)
    >>> int(opt_state.count)
    8
  """
  return TrainStep(loss_fn, optimizer, has_aux=has_aux, dispatch=dispatch,
                   donate=donate, axis_name=axis_name,
                   dynamic_scale=dynamic_scale)
