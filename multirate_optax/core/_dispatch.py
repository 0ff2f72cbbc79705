"""How a train step runs the phase of each step: ``'cond'`` or ``'host'``.

One engine for every train step (the core's, Linen's, NNX's): given the step
of one phase, a pure function of its arguments, it compiles either one program
that picks the phase on the device with ``jax.lax.switch`` (``'cond'``), or
one program per phase picked from a host-side copy of the timetable's count
(``'host'``), with no device-to-host transfer per step. It also refuses what
would make the host-side count wrong: a state inside a wrapper that may skip
updates, a call under the user's own ``jax.jit``, and state buffers that an
earlier call consumed.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import optax

from multirate_optax.core._timetable import Located, locate_timetable_state
from multirate_optax.core._timetabled import tracing_phase

Dispatch = Literal["auto", "cond", "host"]

# Whether a program of 'host' dispatch is being traced: its count must advance
# on every step, a skipped one included (see the core train step).
_TRACING_HOST_PROGRAM: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "multirate_optax_tracing_host_program", default=False)


def tracing_host_program() -> bool:
  """Whether the step being traced is one phase's program of ``'host'`` dispatch.

  The host picks the next program from a count it advances itself, without
  waiting for the device: such a program must advance the count on every step.
  """
  return _TRACING_HOST_PROGRAM.get()


@contextlib.contextmanager
def _tracing_host_program() -> Any:
  token = _TRACING_HOST_PROGRAM.set(True)
  try:
    yield
  finally:
    _TRACING_HOST_PROGRAM.reset(token)

# Nodes of an optimizer state known to advance the inner state they hold
# exactly once per update (optax.chain, named_chain, partition, masked,
# inject_hyperparams, contrib's schedule_free and mechanize; each is tested).
# Inside anything else (apply_if_finite, MultiSteps, conditionally_mask or
# _transform, a wrapper of yours) the inner count may stand still on some
# steps, and a host-side copy of it would drift.
_ADVANCES_ONCE_PER_UPDATE: frozenset[type] = frozenset((
    tuple, list, dict, collections.OrderedDict,
    optax.PartitionState, optax.MaskedState,
    optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState,
    optax.contrib.ScheduleFreeState, optax.contrib.MechanicState,
))


def resolve_dispatch(dispatch: Dispatch, backend: Optional[str] = None) -> str:
  """Resolves ``'auto'``: ``'host'`` on CPU, ``'cond'`` on other backends.

  XLA:CPU runs convolution weight gradients inside ``lax.cond`` on a slow path
  (jax-ml/jax#12868), so a conv net's full branch can be many times slower in
  one program with a conditional than on its own. GPU and TPU have no such
  penalty, and one program is what ``lax.scan`` and pipelining need.

  Args:
    dispatch: ``'auto'``, ``'cond'`` or ``'host'``.
    backend: the backend to resolve ``'auto'`` for; ``None`` means
      ``jax.default_backend()``.

  Returns:
    ``'cond'`` or ``'host'``.

  Example:
    >>> import multirate_optax as mo
    >>> mo.resolve_dispatch('auto', backend='cpu'), mo.resolve_dispatch('auto', backend='gpu')
    ('host', 'cond')
    >>> mo.resolve_dispatch('cond', backend='cpu')
    'cond'
  """
  if dispatch not in ("auto", "cond", "host"):
    raise ValueError(
        f"dispatch must be 'auto', 'cond' or 'host', got {dispatch!r}.")
  if dispatch != "auto":
    return dispatch
  backend = jax.default_backend() if backend is None else backend
  return "host" if backend == "cpu" else "cond"


class PhaseDispatch:
  """Runs ``step_of_phase`` for the phase of the optimizer state's count.

  Args:
    step_of_phase: ``step_of_phase(phase, *args) -> outputs``, pure, with
      ``phase`` a static int; ``args[state_argnum]`` and
      ``outputs[state_argnum]`` are the optimizer state before and after.
    state_argnum: where the optimizer state is, in the arguments and in the
      outputs.
    dispatch: ``'auto'``, ``'cond'`` or ``'host'``.
    donate_argnums: the arguments whose buffers the step may reuse.
    own_jit_hint: the adapter's own way to keep host dispatch inside a jitted
      function of the user's, for :meth:`apply`'s warning (a sentence; empty:
      the adapter has none).
  """

  def __init__(self, step_of_phase: Callable[..., Sequence[Any]], *,
               state_argnum: int, dispatch: Dispatch,
               donate_argnums: tuple[int, ...], own_jit_hint: str = ""):
    self.dispatch = resolve_dispatch(dispatch)
    self._own_jit_hint = own_jit_hint
    self._step_of_phase = step_of_phase
    self._state_argnum = state_argnum
    self._donated = bool(donate_argnums)
    # keep_unused: jit drops the arguments a program does not read (on a
    # step that updates a group with drift, its held updates) and then pairs
    # each output with the first donated argument left of the same shape and
    # dtype, so that another group's state (its momentum) is written into a
    # buffer still to be read: XLA copies it, and the outputs without a
    # buffer are allocated afresh, on every such step. Kept, every output
    # reuses the buffer of the argument in its place.
    self._switch_program = jax.jit(self.switch, donate_argnums=donate_argnums,
                                   keep_unused=True)
    self._phase_program = jax.jit(
        self._host_step, static_argnums=0,
        donate_argnums=tuple(i + 1 for i in donate_argnums), keep_unused=True)
    self._host_count = HostCount(donated=self._donated)

  def _step_of_traced_phase(self, phase: int, *args) -> Sequence[Any]:
    """``step_of_phase``, its optimizer told which phase it traces."""
    timetable = locate_timetable_state(
        args[self._state_argnum]).state.timetable
    with tracing_phase(timetable, phase):
      return self._step_of_phase(phase, *args)

  def _host_step(self, phase: int, *args) -> Sequence[Any]:
    """The program of ``phase`` for ``'host'`` dispatch."""
    with _tracing_host_program():
      return self._step_of_traced_phase(phase, *args)

  def switch(self, *args) -> Sequence[Any]:
    """The step of every phase, one picked with ``jax.lax.switch``; traceable.

    The branch of the phase that leaves the most parameter leaves untouched
    comes first: XLA (before openxla/xla#46314) updates a buffer that a branch
    passes through in place only when that branch is branch 0, and copies it
    on every step otherwise (jax-ml/jax#16661, #38145).
    """
    state = locate_timetable_state(args[self._state_argnum]).state
    timetable = state.timetable
    phases = sorted(
        range(len(timetable.phases)),
        key=lambda phase: -state.active(phase).count(False))
    branches = [functools.partial(self._step_of_traced_phase, phase)
                for phase in phases]
    branch_of_phase = jnp.asarray(
        [phases.index(phase) for phase in range(len(phases))], jnp.int32)
    return jax.lax.switch(branch_of_phase[timetable.phase(state.count)],
                          branches, *args)

  def apply(self, *args) -> Sequence[Any]:
    """:meth:`switch` for a step's ``apply``, warning where it is slow.

    ``'auto'`` resolves to ``'host'`` on CPU because the ``lax.switch``
    program is slow there for conv nets; ``apply`` is that program, so it
    says so rather than switching silently.
    """
    if self.dispatch == "host":
      warnings.warn(
          "apply runs every phase in one lax.switch program ('cond' "
          "dispatch), but this step was built for 'host' dispatch (what "
          "'auto' picks on CPU, where XLA runs convolution weight gradients "
          "inside a conditional on a slow path, jax-ml/jax#12868). "
          + (self._own_jit_hint + " Otherwise call" if self._own_jit_hint
             else "Call")
          + " the step itself outside your jit for host dispatch, or build "
          "it with dispatch='cond' to use apply without this warning.",
          stacklevel=_first_caller_outside_package())
    return self.switch(*args)

  def program(self, *args, phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program of ``phase``, or the ``lax.switch`` one if ``None``."""
    if phase is None:
      return self._switch_program.lower(*args)
    return self._phase_program.lower(phase, *args)

  def __call__(self, *args) -> Sequence[Any]:
    if self.dispatch == "cond":
      return self._run(self._switch_program, args)
    phase = self._host_count.phase(
        locate_timetable_state(args[self._state_argnum]))
    outputs = self._run(functools.partial(self._phase_program, phase), args)
    self._host_count.advance(locate_timetable_state(
        outputs[self._state_argnum]).state.count)
    return outputs

  def _run(self, program: Callable[..., Any], args: Sequence[Any]):
    try:
      return program(*args)
    except (RuntimeError, ValueError) as e:
      for leaf in jax.tree.leaves(args):
        self._host_count.check_not_donated(leaf, e)
      raise


def _first_caller_outside_package() -> int:
  """The ``stacklevel`` of the innermost caller outside this package.

  The core, Linen and NNX steps reach :meth:`PhaseDispatch.apply` through
  different numbers of frames; a warning should point at the user's line.
  """
  package = os.path.dirname(os.path.abspath(__file__))
  frame, level = sys._getframe(1), 1
  while frame is not None and frame.f_code.co_filename.startswith(package):
    frame, level = frame.f_back, level + 1
  return level


class HostCount:
  """A host-side copy of a timetable state's count, read from the device once.

  The count is read only when the state does not hold the count array
  recorded by the last :meth:`advance` (the first step, a restored
  checkpoint, a state from elsewhere); otherwise it is advanced on the host,
  with no device-to-host transfer. It refuses what would make the copy
  wrong: a count inside a wrapper that may skip updates, a traced count, and
  a count whose buffer was donated.

  Args:
    donated: whether the step that uses it donates its arguments (for the
      error message).
  """

  def __init__(self, *, donated: bool = False):
    self._donated = donated
    self._count: Optional[int] = None
    self._last_count: Optional[jax.Array] = None

  def phase(self, located: Located) -> int:
    """The phase of the step about to run on the state ``located`` is in."""
    count = located.state.count
    if count is not self._last_count:
      if isinstance(count, jax.core.Tracer):
        raise TypeError(
            "a train step with 'host' dispatch was called inside a JAX "
            "transformation (jax.jit, nnx.jit, scan, jax.vmap, jax.pmap, "
            "...), where the step count is not known on the host (under "
            "jax.vmap each member may be at another step): build the step "
            "with dispatch='cond', or call its .apply method (one lax.switch "
            "program) inside your own jit; for your own NNX step with host "
            "dispatch, decorate it with multirate_optax.nnx.jit. Under "
            "jax.pmap, also pass axis_name= to the train step to average the "
            "gradients; or, with either dispatch, drop pmap and shard the "
            "batch over a jax.sharding.Mesh (docs/guides/multi_device.md).")
      # Exact types: every optax state is a NamedTuple, a tuple subclass.
      refused = [t for t in located.enclosing
                 if t not in _ADVANCES_ONCE_PER_UPDATE]
      if refused:
        raise ValueError(
            "'host' dispatch counts steps on the host, but the timetable's "
            f"state is inside {refused[0].__module__}.{refused[0].__qualname__},"
            " which is not known to advance it once per step (optax."
            "apply_if_finite, MultiSteps and conditionally_mask skip updates), "
            "so the host-side count could drift from it: use dispatch='cond' "
            "(multirate_optax.nnx.jit always dispatches on the host: use "
            "multirate_optax.nnx.train_step(..., dispatch='cond') there), or "
            "put the wrapper inside the optimizers of the groups.")
      self.check_not_donated(count)
      self._count = int(count)
    return located.state.timetable.phase(self._count)

  def advance(self, new_count: jax.Array) -> None:
    """Records one step taken, which returned the count array ``new_count``."""
    self._count += 1
    self._last_count = new_count

  def check_not_donated(self, leaf: Any,
                        error: Optional[Exception] = None) -> None:
    """Refuses ``leaf`` if it is an array whose buffer a step consumed.

    Args:
      leaf: any leaf of a step's arguments.
      error: the error a program raised on it, chained to this one.
    """
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
      raise ValueError(
          "the train step was given a state whose buffers were already "
          "donated to an earlier call"
          + (" of a step built with donate=True" if self._donated else "")
          + ": pass the state that call returned, or build the step with "
          "donate=False (the default) to keep earlier states usable.") from error
