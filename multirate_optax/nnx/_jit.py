"""Your own NNX train step, compiled once per phase: ``jit`` and ``value_and_grad``.

Flax NNX training code is a function under ``nnx.jit`` that takes gradients
with ``nnx.value_and_grad``, calls ``optimizer.update`` and updates whatever
else it likes (metrics, counters) in place. :func:`jit` compiles such a
function once per phase of the optimizer's timetable and picks the program
from a host-side count (``'host'`` dispatch, as the library's train steps do
on CPU); :func:`value_and_grad`, called inside it, differentiates only the
parameters active in that phase. The phase is a static argument of the
compiled function and reaches ``value_and_grad`` through a context set while
the function is traced, so the user's code keeps its shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from multirate_optax.core._dispatch import HostCount
from multirate_optax.core._timetable import Located, locate_timetable_state
from multirate_optax.core._timetabled import tracing_phase


class _Tracing(NamedTuple):
  """What :func:`value_and_grad` needs to know while :func:`jit` traces."""

  optimizer: nnx.Optimizer  # The traced copy of the optimizer.
  phase: int


_TRACING: contextvars.ContextVar[Optional[_Tracing]] = contextvars.ContextVar(
    "multirate_optax_nnx_tracing", default=None)


@contextlib.contextmanager
def _tracing(optimizer: nnx.Optimizer, phase: int) -> Iterator[None]:
  """Tells :func:`value_and_grad` and the optimizer's update the phase traced."""
  token = _TRACING.set(_Tracing(optimizer, phase))
  try:
    with tracing_phase(_located(optimizer).state.timetable, phase):
      yield
  finally:
    _TRACING.reset(token)


def _located(optimizer: nnx.Optimizer) -> Located:
  """The timetable state in ``optimizer``, its count an array or a tracer."""
  return locate_timetable_state(nnx.as_pure(optimizer.opt_state))


def _find_optimizer(args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[Any, nnx.Optimizer]:
  """The position (index or keyword) and the one ``nnx.Optimizer`` argument."""
  found = [(i, a) for i, a in enumerate(args) if isinstance(a, nnx.Optimizer)]
  found += [(k, a) for k, a in kwargs.items() if isinstance(a, nnx.Optimizer)]
  if len(found) != 1:
    raise TypeError(
        "multirate_optax.nnx.jit takes its phase from the one nnx.Optimizer "
        f"among the function's arguments, found {len(found)}: pass the "
        "optimizer (holding a multirate optimizer state) as an argument, and "
        "only one.")
  return found[0]


def jit(fun: Optional[Callable[..., Any]] = None, **jit_kwargs: Any):
  """``nnx.jit`` for a train step, with one program per multirate phase.

  Decorate your step function with it instead of ``nnx.jit``, and take
  gradients in it with :func:`value_and_grad` instead of
  ``nnx.value_and_grad``. The function must take the ``nnx.Optimizer``
  (holding one :func:`multirate_optax.multirate`) as an argument and call
  ``optimizer.update`` once; everything else (metrics, rng streams,
  BatchNorm statistics) updates in place as under ``nnx.jit``.

  Each call picks the program of the current phase from a host-side copy of
  the optimizer's count, read from the device only on the first call or when
  the optimizer's count is not the one the last call left (a restored
  checkpoint), so no step waits for the previous one. The programs are
  compiled once each, like ``nnx.jit``'s.

  Args:
    fun: the train step; ``jit(**jit_kwargs)`` without it gives a decorator.
    **jit_kwargs: passed to ``nnx.jit`` (``donate_argnums`` counts
      ``fun``'s arguments, ...); not ``static_argnums`` or positional
      ``in_shardings``.

  Returns:
    The compiled step, called like ``fun``; its ``program(*args,
    phase=...)`` gives the lowered program of a phase.

  Raises:
    TypeError: when called with no or several ``nnx.Optimizer`` arguments,
      or if ``fun`` does not update the optimizer.

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
    >>> metrics = nnx.metrics.Average('loss')
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> @mo.nnx.jit
    ... def train_step(model, optimizer, metrics, x, y):
    ...   loss, grads = mo.nnx.value_and_grad(loss_fn)(model, x, y)
    ...   metrics.update(loss=loss)
    ...   optimizer.update(model, grads)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(8):
    ...   train_step(model, optimizer, metrics, x, y)
    >>> int(optimizer.step[...]), int(metrics.count[...])
    (8, 8)
  """
  if fun is None:
    return functools.partial(jit, **jit_kwargs)
  if "static_argnums" in jit_kwargs or "static_argnames" in jit_kwargs:
    raise TypeError(
        "multirate_optax.nnx.jit adds its own static argument (the phase); "
        "close over static values instead of passing static_argnums or "
        "static_argnames.")
  if isinstance(jit_kwargs.get("in_shardings"), (tuple, list)):
    raise TypeError(
        "multirate_optax.nnx.jit puts two static arguments (the phase and "
        "where the optimizer is) before fun's, so positional in_shardings "
        "would not line up: place the arrays with jax.device_put (or "
        "nnx.with_sharding_constraint inside) instead.")
  donated = jit_kwargs.pop("donate_argnums", ())
  donated = (donated,) if isinstance(donated, int) else tuple(donated)
  if donated:  # Positions in fun's arguments, after the two static ones.
    jit_kwargs["donate_argnums"] = tuple(i + 2 for i in donated)
  donates = bool(donated or jit_kwargs.get("donate_argnames"))

  @functools.partial(nnx.jit, static_argnums=(0, 1), **jit_kwargs)
  def of_phase(phase, where, *args, **kwargs):
    optimizer = kwargs[where] if isinstance(where, str) else args[where]
    before = _located(optimizer).state.count
    with _tracing(optimizer, phase):
      out = fun(*args, **kwargs)
    if _located(optimizer).state.count is before:
      raise TypeError(
          f"{getattr(fun, '__name__', fun)!r} under multirate_optax.nnx.jit "
          "did not update its optimizer: call optimizer.update(model, grads) "
          "in it once, and compile functions that do not train (evaluation) "
          "with nnx.jit.")
    return out

  # One host-side count per optimizer, dropped with it.
  counts: weakref.WeakKeyDictionary[nnx.Optimizer, HostCount] = (
      weakref.WeakKeyDictionary())

  @functools.wraps(fun)
  def step(*args, **kwargs):
    where, optimizer = _find_optimizer(args, kwargs)
    count = counts.get(optimizer)
    if count is None:
      count = counts[optimizer] = HostCount(donated=donates)
    located = _located(optimizer)
    phase = count.phase(located)
    try:
      out = of_phase(phase, where, *args, **kwargs)
    except (RuntimeError, ValueError) as e:
      count.check_not_donated(located.state.count, e)
      raise
    count.advance(_located(optimizer).state.count)
    return out

  def program(*args, phase: int, **kwargs) -> jax.stages.Lowered:
    """The lowered program of ``phase`` for these arguments, to inspect."""
    where, _ = _find_optimizer(args, kwargs)
    return of_phase.lower(phase, where, *args, **kwargs)

  step.program = program
  return step


def value_and_grad(fun: Callable[..., Any], *, has_aux: bool = False):
  """``nnx.value_and_grad`` of ``fun``'s first argument, active parameters only.

  Call it inside a function compiled with :func:`jit`: it differentiates the
  parameters of the model (``fun``'s first argument) that the optimizer
  trains (its ``wrt``) and that are active in the phase being compiled; the
  others are closed over as constants, so no backward work is done for them,
  and their gradients are zeros, so ``optimizer.update(model, grads)`` works
  as usual.

  Args:
    fun: ``fun(model, *args) -> loss`` or ``(loss, aux)``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.

  Returns:
    ``f(model, *args) -> (value, grads)`` as from ``nnx.value_and_grad``.

  Raises:
    RuntimeError: when called outside a function compiled with :func:`jit`.

  Example:
    Step 0 is a slow step (every parameter gets a gradient), step 1 a fast
    one (the body's gradients are zeros, and not computed):

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import multirate_optax as mo
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Linear(3, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.body(x)))
    >>> tx = mo.multirate(optax.sgd(0.01),
    ...                   labels=mo.nnx.fast_by_filter(nnx.PathContains('head')),
    ...                   period=4)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> model = Net(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @mo.nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss, grads = mo.nnx.value_and_grad(loss_fn)(model, x, y)
    ...   optimizer.update(model, grads)
    ...   return grads
    >>> for t in range(2):
    ...   grads = train_step(model, optimizer, x, y)
    ...   print(t, bool(jnp.any(grads['body']['kernel'][...] != 0)),
    ...         bool(jnp.any(grads['head']['kernel'][...] != 0)))
    0 True True
    1 False True
  """

  def value_and_active_grad(model, *args, **kwargs):
    tracing = _TRACING.get()
    if tracing is None:
      raise RuntimeError(
          "multirate_optax.nnx.value_and_grad was called outside a function "
          "compiled with multirate_optax.nnx.jit, so the phase (which "
          "parameters get gradients) is unknown: decorate the train step with "
          "multirate_optax.nnx.jit instead of nnx.jit.")
    optimizer, phase = tracing
    params = nnx.state(model, optimizer.wrt)
    flat = list(nnx.to_flat_state(params))
    located = _located(optimizer)
    active = located.state.active(phase)
    if len(active) != len(flat):
      raise ValueError(
          f"the model has {len(flat)} parameters under the optimizer's wrt, "
          f"but the optimizer was built for {len(active)}: pass the model "
          "the optimizer was built for as the first argument.")
    active_paths = frozenset(
        path for (path, _), is_active in zip(flat, active) if is_active)
    differentiated = nnx.All(optimizer.wrt,
                             lambda path, _: path in active_paths)
    value, grads = nnx.value_and_grad(
        fun, argnums=nnx.DiffState(0, differentiated), has_aux=has_aux)(
            model, *args, **kwargs)
    got = dict(nnx.to_flat_state(grads))
    full = [(path, got[path] if path in got else
             jax.tree.map(jnp.zeros_like, variable))
            for path, variable in flat]
    return value, nnx.from_flat_state(full)

  return value_and_active_grad
