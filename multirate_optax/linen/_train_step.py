"""Linen's train state and its multirate train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import optax
from flax.training import train_state

from multirate_optax.core._gradients import check_loss_signature, describe
from multirate_optax.core._timetable import find_timetable_state
from multirate_optax.core._dispatch import Dispatch, resolve_dispatch
from multirate_optax.core._train_step import AxisName, TrainStep as CoreTrainStep

PyTree = Any


class TrainState(train_state.TrainState):
  """Flax's ``TrainState``, with ``batch_stats``, for multirate training.

  A subclass of ``flax.training.train_state.TrainState``: the same fields,
  ``create`` and ``apply_gradients`` (which applies gradients you computed in
  full, as in Flax), plus ``batch_stats``. Advance it with a step from
  :func:`train_step` to compute only the gradients each phase uses.

  Attributes:
    step: number of train steps taken (a Python int unless restored as an
      array; the multirate step advances it on the host, at no device cost).
    apply_fn: usually ``model.apply``.
    params: the ``'params'`` collection.
    tx: the optimizer; it must contain one :func:`multirate_optax.multirate`.
    opt_state: the optimizer state; its multirate count decides the phase.
    batch_stats: the ``'batch_stats'`` collection, or ``None`` (the default)
      for a model without BatchNorm: then the loss takes no batch statistics.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import multirate_optax as mo
    >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(1)])
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> params = mlp.init(jax.random.key(0), x)['params']
    >>> tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path('layers_2'),
    ...                   period=2)
    >>> state = mo.linen.TrainState.create(apply_fn=mlp.apply, params=params, tx=tx)
    >>> state.step, state.batch_stats, mo.find_timetable_state(state.opt_state).labels
    (0, None, ('slow', 'slow', 'fast', 'fast'))
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((mlp.apply({'params': params}, x) - y) ** 2)
    >>> state, loss = mo.linen.train_step(loss_fn)(state, x, y)
    >>> state.step
    1

    An optimizer without a timetable is refused when the state is created:

    >>> try:
    ...   mo.linen.TrainState.create(apply_fn=mlp.apply, params=params,
    ...                              tx=optax.sgd(0.1))
    ... except ValueError as e:
    ...   print(str(e)[:59])
    the optimizer state holds no timetable of active groups: bu
  """

  batch_stats: Optional[PyTree] = None

  @classmethod
  def create(cls, *, apply_fn: Callable[..., Any], params: PyTree,
             tx: optax.GradientTransformation, **kwargs) -> "TrainState":
    """A state at step 0 with a freshly initialised optimizer state.

    Args:
      apply_fn: usually ``model.apply``.
      params: ``variables['params']``.
      tx: an optimizer containing one :func:`multirate_optax.multirate`.
      **kwargs: other fields, e.g. ``batch_stats=variables['batch_stats']``.

    Raises:
      ValueError: if ``tx`` holds no timetable, or its labels do not
        fit ``params``.
    """
    state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
    find_timetable_state(state.opt_state)  # Fail here, not at the first step.
    return state


def _batch_stats_of(state: Any) -> Optional[PyTree]:
  """The state's batch statistics; ``None`` for none (Flax's own TrainState)."""
  return getattr(state, "batch_stats", None)


def _dynamic_scale_of(state: Any) -> Optional[Any]:
  """The state's loss scale (Flax's ``DynamicScale``), as Flax's examples name it."""
  return getattr(state, "dynamic_scale", None)


class TrainStep:
  """A multirate train step on a Linen :class:`TrainState`.

  Call it as ``state, value = step(state, *args)`` (``args``: the batch, and
  an rng if the loss takes one); ``value`` is the loss, or ``(loss, aux)``
  with ``has_aux=True``. Build it with :func:`train_step`. ``state`` is a
  :class:`TrainState` or Flax's own ``TrainState``. One core
  :class:`multirate_optax.TrainStep` is kept per optimizer (``state.tx``) and
  loss form, so compiled programs and the host-side step count of ``'host'``
  dispatch carry over from call to call.

  Example:
    Called step by step, and its uncompiled :meth:`apply` inside a
    ``lax.scan`` of your own, which follow the same timetable:

    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import multirate_optax as mo
    >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(1)])
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> params = mlp.init(jax.random.key(0), x)['params']
    >>> tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path('layers_2'),
    ...                   period=2)
    >>> state = mo.linen.TrainState.create(apply_fn=mlp.apply, params=params, tx=tx)
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((mlp.apply({'params': params}, x) - y) ** 2)
    >>> step = mo.linen.train_step(loss_fn, dispatch='cond')
    >>> xs, ys = jnp.ones((4, 8, 3)), jnp.zeros((4, 8, 1))
    >>> stepped = state
    >>> for x, y in zip(xs, ys):
    ...   stepped, loss = step(stepped, x, y)
    >>> scanned, losses = jax.lax.scan(
    ...     lambda state, batch: step.apply(state, *batch), state, (xs, ys))
    >>> step.dispatch, stepped.step, int(scanned.step), losses.shape
    ('cond', 4, 4, (4,))
    >>> bool(jnp.allclose(loss, losses[-1]))
    True
  """

  def __init__(self, loss_fn: Callable[..., Any], *, has_aux: bool,
               dispatch: Dispatch, donate: bool, axis_name: AxisName = None):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._has_aux = has_aux
    self.dispatch = resolve_dispatch(dispatch)
    self._donate = donate
    self._axis_name = axis_name
    self._core_steps: dict[tuple[Any, bool, bool], CoreTrainStep] = {}

  def _loss_with_batch_stats(self, params, batch_stats, *args):
    """The user's loss in the core's ``(loss, aux)`` form."""
    out = self._loss_fn(params, batch_stats, *args)
    expected = ("(loss, (new_batch_stats, aux))" if self._has_aux
                else "(loss, new_batch_stats)")
    if not (isinstance(out, tuple) and len(out) == 2):
      hint = ("" if self._has_aux else
              "; for a model without BatchNorm, create the state without "
              "batch_stats and the loss is loss_fn(params, *args)")
      raise TypeError(
          f"the state has batch_stats, so loss_fn must return {expected} "
          f"(has_aux={self._has_aux}), got {describe(out)}{hint}.")
    if self._has_aux and not (isinstance(out[1], tuple) and len(out[1]) == 2):
      raise TypeError(
          f"with has_aux=True and batch_stats in the state, loss_fn must "
          f"return {expected}, got (loss, {describe(out[1])}).")
    loss, rest = out
    new_batch_stats = rest[0] if self._has_aux else rest
    if self._axis_name:
      # Replicas whose BatchNorm has no axis_name of its own would keep
      # statistics of their own shards; with one they are already equal.
      new_batch_stats = jax.lax.pmean(new_batch_stats, self._axis_name)
      rest = (new_batch_stats, rest[1]) if self._has_aux else new_batch_stats
    want = jax.tree.structure(batch_stats)
    got = jax.tree.structure(new_batch_stats)
    if got != want:
      aux_hint = ("" if self._has_aux else
                  " If the second value is something else (logits, metrics),"
                  " build the step with has_aux=True and return (loss, "
                  "(new_batch_stats, aux)).")
      raise ValueError(
          "loss_fn returned new batch_stats whose structure differs from "
          "state.batch_stats:\n  returned: "
          + (describe(new_batch_stats) if got.num_nodes == 1 else str(got))
          + f"\n  expected: {want}\n"
          "Return updates['batch_stats'] from "
          "apply(..., mutable=['batch_stats'])." + aux_hint)
    return loss, rest

  def _core_step(self, tx: optax.GradientTransformation,
                 with_batch_stats: bool, with_dynamic_scale: bool,
                 num_args: int) -> CoreTrainStep:
    key = (tx, with_batch_stats, with_dynamic_scale)
    if key not in self._core_steps:
      try:
        check_loss_signature(self._loss_fn, num_args)
      except TypeError as e:
        form = ("loss_fn(params, batch_stats, *args), as the state has "
                "batch_stats" if with_batch_stats else
                "loss_fn(params, *args), as the state has no batch_stats")
        raise TypeError(f"{e} The step calls {form}; args are what the "
                        "step is called with after the state.") from None
      loss = (self._loss_with_batch_stats if with_batch_stats
              else self._loss_fn)
      self._core_steps[key] = CoreTrainStep(
          loss, tx, has_aux=with_batch_stats or self._has_aux,
          dispatch=self.dispatch, donate=self._donate,
          axis_name=self._axis_name, dynamic_scale=with_dynamic_scale)
    return self._core_steps[key]

  def _run(self, method: str, state: Any, args: tuple[Any, ...], **kwargs):
    if not isinstance(state, train_state.TrainState):
      raise TypeError(
          "expected a multirate_optax.linen.TrainState or Flax's "
          f"flax.training.train_state.TrainState, got {type(state).__name__}.")
    batch_stats = _batch_stats_of(state)
    dynamic_scale = _dynamic_scale_of(state)
    pre = () if batch_stats is None else (batch_stats,)
    core = self._core_step(state.tx, batch_stats is not None,
                           dynamic_scale is not None, len(pre) + len(args))
    scale = () if dynamic_scale is None else (dynamic_scale,)
    return getattr(core, method)(state.params, state.opt_state, *scale, *pre,
                                 *args, **kwargs)

  def _advanced(self, state: Any, outputs):
    if _dynamic_scale_of(state) is None:
      params, opt_state, value = outputs
      changes = dict(params=params, opt_state=opt_state)
    else:
      params, opt_state, dynamic_scale, value = outputs
      changes = dict(params=params, opt_state=opt_state,
                     dynamic_scale=dynamic_scale)
    changes["step"] = state.step + 1
    if _batch_stats_of(state) is None:
      return state.replace(**changes), value
    loss, rest = value
    new_batch_stats, aux = rest if self._has_aux else (rest, None)
    state = state.replace(batch_stats=new_batch_stats, **changes)
    return state, ((loss, aux) if self._has_aux else loss)

  def __call__(self, state: Any, *args):
    return self._advanced(state, self._run("__call__", state, args))

  def apply(self, state: Any, *args):
    """The uncompiled step, choosing the phase with ``jax.lax.switch``.

    Pure and traceable: use it inside your own ``jax.jit`` or ``lax.scan``.
    """
    return self._advanced(state, self._run("apply", state, args))

  def program(self, state: Any, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program for these arguments.

    See :meth:`multirate_optax.TrainStep.program`.
    """
    return self._run("program", state, args, phase=phase)


def train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = False,
    axis_name: AxisName = None,
) -> TrainStep:
  """Builds a multirate train step for a Linen train state.

  On slow steps every parameter gets a gradient, on fast steps only the fast
  ones (see :func:`multirate_optax.train_step`). The forward pass, BatchNorm
  statistics and dropout run as usual on every step.

  Half precision: a state with a ``dynamic_scale`` field that is not ``None``
  (Flax's ``flax.training.dynamic_scale.DynamicScale``, as in Flax's ImageNet
  example) is trained as Flax's examples do: the loss is scaled, the
  gradients unscaled, the scale adapted, and a step with non-finite gradients
  leaves the parameters and optimizer state as they were (the batch
  statistics are the model's, as there). With ``'cond'`` dispatch the step
  count of the timetable stays too, so the same phase is retried with the
  next batch; with ``'host'`` it advances and a skipped slow step's update is
  missed, with a warning (see :func:`multirate_optax.train_step`).

  Args:
    loss_fn: for a state without ``batch_stats`` (Flax's ``TrainState``, or
      :class:`TrainState` created without them), ``loss_fn(params, *args)``
      returning the loss, or ``(loss, aux)`` with ``has_aux=True``. For a
      state with ``batch_stats``, ``loss_fn(params, batch_stats, *args)``
      returning ``(loss, new_batch_stats)``, or ``(loss, (new_batch_stats,
      aux))`` with ``has_aux=True``, where ``new_batch_stats`` is
      ``updates['batch_stats']`` from ``apply(..., mutable=['batch_stats'])``.
      ``args`` are what the step is called with after the state: the batch,
      and an rng for dropout if the model needs one.
    has_aux: whether ``loss_fn`` also returns ``aux``.
    dispatch: ``'cond'``, ``'host'`` or ``'auto'``, as in
      :func:`multirate_optax.train_step`.
    donate: donate the parameter and optimizer-state buffers to the step, to
      save memory: the state passed in is then consumed (its arrays deleted),
      including the arrays given to ``TrainState.create`` and any state kept
      for later. ``False`` (the default) keeps every state usable, as Flax's
      ``apply_gradients`` does.
    axis_name: inside ``jax.pmap``, the named axis to average the gradients
      (and the new batch statistics) over, as Flax's examples do with
      ``lax.pmean``; needs ``dispatch='cond'``. See
      :func:`multirate_optax.train_step`.

  Returns:
    A :class:`TrainStep`: ``state, value = step(state, *args)`` with
    ``value`` the loss, or ``(loss, aux)`` with ``has_aux=True``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import multirate_optax as mo
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(2, name='head')(x)
    >>> model = Net()
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> def loss_fn(params, batch_stats, batch, rng):
    ...   x, y = batch
    ...   logits, updates = model.apply(
    ...       {'params': params, 'batch_stats': batch_stats}, x, train=True,
    ...       mutable=['batch_stats'], rngs={'dropout': rng})
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    ...   return loss, updates['batch_stats']
    >>> tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path('^head/'),
    ...                   period=4)
    >>> state = mo.linen.TrainState.create(
    ...     apply_fn=model.apply, params=variables['params'], tx=tx,
    ...     batch_stats=variables['batch_stats'])
    >>> step = mo.linen.train_step(loss_fn)
    >>> key = jax.random.key(1)
    >>> for t in range(8):
    ...   state, loss = step(state, (x, y), jax.random.fold_in(key, t))
    >>> state.step
    8

    Flax's own ``TrainState`` and a loss without batch statistics or rng:

    >>> from flax.training import train_state
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> def mlp_loss(params, batch):
    ...   logits = mlp.apply({'params': params}, batch[0])
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, batch[1]).mean()
    >>> state = train_state.TrainState.create(
    ...     apply_fn=mlp.apply, params=mlp.init(jax.random.key(0), x)['params'],
    ...     tx=mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path('layers_2'),
    ...                     period=4))
    >>> state, loss = mo.linen.train_step(mlp_loss)(state, (x, y))
    >>> int(state.step)
    1
  """
  return TrainStep(loss_fn, has_aux=has_aux, dispatch=dispatch, donate=donate,
                   axis_name=axis_name)
