"""The compiled train step, and how it chooses its phase on each step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, Optional

import jax
import optax

from multirate_optax._gradients import check_loss_signature, value_and_active_grad
from multirate_optax._schedule import Schedule, find_schedule_state

PyTree = Any
Dispatch = Literal["auto", "cond", "host"]


def resolve_dispatch(dispatch: Dispatch, backend: Optional[str] = None) -> str:
  """Resolves ``'auto'``: ``'host'`` on CPU, ``'cond'`` on other backends.

  XLA:CPU runs convolution weight gradients inside ``lax.cond`` on a slow path
  (jax-ml/jax#12868), so a conv net's full branch can be many times slower in
  one program with a conditional than on its own. GPU and TPU have no such
  penalty, and one program is what ``lax.scan`` and pipelining need.
  """
  if dispatch not in ("auto", "cond", "host"):
    raise ValueError(
        f"dispatch must be 'auto', 'cond' or 'host', got {dispatch!r}.")
  if dispatch != "auto":
    return dispatch
  backend = jax.default_backend() if backend is None else backend
  return "host" if backend == "cpu" else "cond"


class TrainStep:
  """A jit-compiled train step that differentiates only the active parameters.

  Call it as ``params, opt_state, value = step(params, opt_state, *args)``,
  where ``value`` is what ``loss_fn(params, *args)`` returns (``loss``, or
  ``(loss, aux)`` with ``has_aux=True``). Build it with :func:`train_step`.

  The phase of a step comes from the count in the optimizer state's
  :class:`ScheduleState`. With ``'cond'`` dispatch one program holds every
  phase and ``jax.lax.switch`` picks one on the device. With ``'host'``
  dispatch there is one program per phase met, picked from a host-side copy of
  the count: the copy is read from the device once, on the first call and
  whenever the state passed in is not the one this step last returned (a
  restored checkpoint, say), and then advanced on the host, with no
  device-to-host transfer per step.
  """

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      optimizer: optax.GradientTransformation,
      *,
      has_aux: bool,
      dispatch: Dispatch,
      donate: bool,
  ):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._optimizer = optimizer
    self._has_aux = has_aux
    self.dispatch = resolve_dispatch(dispatch)
    donate_argnums = (0, 1) if donate else ()
    self._cond_program = jax.jit(self.apply, donate_argnums=donate_argnums)
    self._phase_program = jax.jit(
        self.apply_phase, static_argnums=0,
        donate_argnums=tuple(i + 1 for i in donate_argnums))
    self._host_count = HostCount()

  def apply_phase(self, phase: int, params: PyTree, opt_state: PyTree, *args):
    """The uncompiled step of one phase (``phase`` is a static int)."""
    schedule_state, _ = find_schedule_state(opt_state)
    check_loss_signature(self._loss_fn, len(args))
    value, grads = value_and_active_grad(
        self._loss_fn, schedule_state.active(phase), self._has_aux)(
            params, *args)
    updates, opt_state = self._optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def apply(self, params: PyTree, opt_state: PyTree, *args):
    """The uncompiled step, choosing the phase with ``jax.lax.switch``.

    Pure and traceable: use it inside your own ``jax.jit`` or ``lax.scan``.
    """
    schedule_state, _ = find_schedule_state(opt_state)
    schedule = schedule_state.schedule
    branches = [
        functools.partial(self.apply_phase, phase, params, opt_state, *args)
        for phase in range(len(schedule.phases))]
    return jax.lax.switch(schedule.phase(schedule_state.count), branches)

  def program(self, params: PyTree, opt_state: PyTree, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    Args:
      params, opt_state, *args: as for a call (shapes and dtypes matter).
      phase: with ``'host'`` dispatch, the phase whose program to return;
        ``None`` returns the single ``lax.switch`` program of ``'cond'``.
    """
    if phase is None:
      return self._cond_program.lower(params, opt_state, *args)
    return self._phase_program.lower(phase, params, opt_state, *args)

  def __call__(self, params: PyTree, opt_state: PyTree, *args):
    if self.dispatch == "cond":
      return self._cond_program(params, opt_state, *args)
    schedule_state, inside_skipping = find_schedule_state(opt_state)
    phase = self._host_count.phase(
        schedule_state.schedule, schedule_state.count, inside_skipping)
    params, opt_state, value = self._phase_program(
        phase, params, opt_state, *args)
    self._host_count.advance(find_schedule_state(opt_state)[0].count)
    return params, opt_state, value


class HostCount:
  """A host-side copy of a schedule's count, for ``'host'`` dispatch.

  The count is read from the device only when the state passed in does not
  hold the count array this copy last recorded (the first call, a restored
  checkpoint, a state from elsewhere); otherwise it is advanced on the host.
  """

  def __init__(self):
    self._count: Optional[int] = None
    self._last: Optional[jax.Array] = None

  def phase(self, schedule: Schedule, count: jax.Array,
            inside_skipping: bool) -> int:
    """The phase of the step about to run, whose state holds ``count``."""
    if count is not self._last:
      if inside_skipping:
        raise ValueError(
            "'host' dispatch counts steps on the host, but the multirate state "
            "is inside a wrapper that can skip updates (optax.apply_if_finite "
            "or optax.MultiSteps), whose skipped steps would desynchronise "
            "that count: use dispatch='cond', or put the wrapper inside the "
            "fast/slow optimizers of multirate.")
      self._count = int(count)
    return schedule.phase(self._count)

  def advance(self, count: jax.Array) -> None:
    """Records one step done, and the count array of the state it returned."""
    self._count += 1
    self._last = count


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = True,
) -> TrainStep:
  """Builds a compiled train step that skips the backward pass of inactive groups.

  On a slow step every parameter gets a gradient; on a fast step only the fast
  parameters do, the slow ones being closed over as constants, so no backward
  work is done for them. The optimizer must contain exactly one schedule
  (:func:`multirate`), alone or inside ``optax.chain`` and other wrappers.

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
    donate: donate the parameter and optimizer-state buffers to the step.

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
  """
  return TrainStep(loss_fn, optimizer, has_aux=has_aux, dispatch=dispatch,
                   donate=donate)
