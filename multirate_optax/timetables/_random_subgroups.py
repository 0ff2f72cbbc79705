"""Random subgroups: multirate training with a random elementwise slow subset.

Every ``period`` steps a new random subset of the weights (each weight
independently, with probability ``fraction``) becomes the slow subgroup. On the
other steps, the fast steps, the slow weights are zero in the forward pass and
only the fast weights are updated; every ``period``-th step is a full step on
all weights. This regularises training from scratch, somewhat like
DropConnect with a drop pattern held for ``period`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multirate_optax.core._checks import real_number, whole_number
from multirate_optax.core._timetable import Step, Timetable, find_timetable_state
from multirate_optax.core._timetabled import timetabled

PyTree = Any

# Every leaf is differentiated on every step: the subgroups are elementwise,
# and backward work cannot be skipped for scattered elements of a tensor.
ALL = "all"


@dataclasses.dataclass(frozen=True)
class RandomSubgroupsTimetable(Timetable):
  """One phase in which every parameter leaf gets gradients.

  Full steps, ``t % period == 0``, and fast steps differ within leaves only,
  which :func:`random_subgroups` handles, so a train step compiles a single
  program.

  Example:
    >>> import multirate_optax as mo
    >>> timetable = mo.RandomSubgroupsTimetable(period=3)
    >>> timetable.phases, [timetable.phase(t) for t in range(4)]
    ((frozenset({'all'}),), [0, 0, 0, 0])
    >>> [bool(timetable.is_full_step(t)) for t in range(4)]
    [True, False, False, True]
  """

  period: int

  def __post_init__(self):
    object.__setattr__(self, "period", whole_number(self.period, "period"))

  @property
  def phases(self) -> tuple[frozenset[str], ...]:
    return (frozenset({ALL}),)

  def phase(self, step: Step) -> Step:
    if isinstance(step, (int, np.integer)):
      return 0
    return jnp.zeros([], jnp.int32)

  def is_full_step(self, step: Step) -> Step:
    """Whether ``step`` updates every weight."""
    return step % self.period == 0


class RandomSubgroupsState(NamedTuple):
  """State of :func:`random_subgroups`.

  Attributes:
    key: the PRNG key the slow subgroups are drawn from; the subgroup of cycle
      ``c`` (steps ``c * period`` to ``(c + 1) * period - 1``) is drawn from
      ``jax.random.fold_in(key, c)``.
    slow: for each weight, whether it is in the current slow subgroup (bool,
      with the parameters' structure).
    slow_values: the slow weights' values (zeros elsewhere), kept here while
      the parameters hold zeros in their place.
    inner: the optimizer's state.

  Example:
    After the full step 0, the subgroup of cycle 0 is drawn; its weights are
    zero in the parameters and kept here:

    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> tx = mo.random_subgroups(optax.sgd(0.1), fraction=0.5, period=2,
    ...                          key=jax.random.key(0))
    >>> params = {'w': jnp.ones(6)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(6)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> subgroups = mo.random_subgroups_state(state)
    >>> subgroups.slow['w'].tolist()
    [True, False, True, False, True, True]
    >>> print(subgroups.slow_values['w'], params['w'])
    [0.9 0.  0.9 0.  0.9 0.9] [0.  0.9 0.  0.9 0.  0. ]
  """

  key: jax.Array
  slow: PyTree
  slow_values: PyTree
  inner: optax.OptState


def _draw_slow(key: jax.Array, cycle: jax.Array, fraction: float,
               params: PyTree) -> PyTree:
  cycle_key = jax.random.fold_in(key, cycle)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jax.random.bernoulli(jax.random.fold_in(cycle_key, i), fraction,
                           jnp.shape(leaf))
      for i, leaf in enumerate(leaves)])


def random_subgroups(
    optimizer: optax.GradientTransformation,
    *,
    fraction: float,
    period: int,
    key: jax.Array,
) -> optax.GradientTransformationExtraArgs:
  """Multirate training whose slow part is a random subset of the weights.

  Steps are counted from 0; cycle ``c`` is steps ``c * period`` to
  ``(c + 1) * period - 1``. Its first step is a *full step*: the forward pass
  uses all weights and ``optimizer`` updates all of them. Right after it, a
  new slow subgroup is drawn: each weight of each leaf independently with
  probability ``fraction``. The other steps of the cycle are *fast steps*:
  the slow weights are zero in the forward pass, get exactly zero update, and
  their entries of the optimizer state (momentum, Adam's moments) are left
  untouched, while the fast weights take ordinary steps. The slow weights get
  their values back for the next full step.

  The zeros reach the forward pass through the parameters themselves: between
  the full step and the end of its cycle, the parameters the train step
  returns hold zeros in place of the slow weights, whose values are kept in
  this state. Evaluate or save :func:`full_weights`, which puts them back.
  This transformation must therefore come last, after any other
  transformation of the updates (its updates on subgroup changes are exact
  moves to zero and back), and be given ``params``.

  The method's poster says "Set θ_S to zero during fast parameter update",
  which could also mean that only the slow weights' *updates* are zero on fast
  steps, with the full network in the forward pass; that reading is not the
  one implemented here. Slow weights are zeroed, not rescaled (unlike
  DropConnect's ``1 / (1 - p)``), following the poster's wording.

  The subgroups are elementwise, so every parameter leaf is differentiated on
  every step: unlike layer-wise multirate, fast steps do the same backward work
  as full steps (the gradients of the slow weights are computed and dropped).

  Args:
    optimizer: the optimizer of all weights, e.g. ``optax.sgd(0.1,
      momentum=0.9)``. Its state must hold per-parameter trees that
      :func:`optax.tree_map_params` can find (true of optax's optimizers).
    fraction: the probability that a weight is slow, in ``[0, 1]``.
    period: ``k >= 1``, steps per cycle; ``period=1`` is plain training with
      ``optimizer``.
    key: a JAX PRNG key, kept in the state.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`TimetableState` whose group ``'all'`` holds a
    :class:`RandomSubgroupsState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> tx = mo.random_subgroups(optax.sgd(0.1), fraction=0.5, period=2,
    ...                          key=jax.random.key(0))
    >>> params = {'w': jnp.ones(6)}
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones(6)}
    >>> updates, state = tx.update(grads, state, params)  # full step
    >>> params = optax.apply_updates(params, updates)
    >>> print(params['w'])  # slow weights zeroed for the fast step
    [0.  0.9 0.  0.9 0.  0. ]
    >>> print(mo.full_weights(params, state)['w'])
    [0.9 0.9 0.9 0.9 0.9 0.9]

  References:
    Vlaar & Leimkuhler, `Multirate Training of Neural Networks
    <https://arxiv.org/abs/2106.10771>`_, ICML 2022 (the poster's
    random-subgroup variant).
  """
  fraction = real_number(fraction, "fraction")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
  timetable = RandomSubgroupsTimetable(period)
  optimizer = optax.with_extra_args_support(optimizer)

  def held(inner_state: optax.OptState, hold: PyTree) -> PyTree:
    """``hold`` on the per-parameter leaves of the state, False elsewhere."""
    return optax.tree_map_params(
        optimizer, lambda _, h: h, inner_state, hold,
        transform_non_params=lambda _: False)

  def init_fn(params):
    inner = optimizer.init(params)
    no_weight = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bool), params)
    try:
      held(inner, no_weight)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          "random_subgroups cannot find the per-parameter entries of the "
          "optimizer's state with optax.tree_map_params, which it needs to "
          f"leave the slow weights' entries untouched: {e}") from e
    return RandomSubgroupsState(
        key=key, slow=no_weight,
        slow_values=jax.tree.map(jnp.zeros_like, params), inner=inner)

  def update_fn(count, updates, own, params, **extra_args):
    if params is None:
      raise ValueError(
          "random_subgroups needs params in update, to zero the slow weights "
          "and put them back.")
    fast_step = jnp.logical_not(timetable.is_full_step(count))
    # Slow weights now hold zeros in params; their values are in own.
    slow_now = jax.tree.map(lambda s: s & fast_step, own.slow)
    grads = jax.tree.map(lambda g, s: jnp.where(s, jnp.zeros_like(g), g),
                         updates, slow_now)
    steps, inner = optimizer.update(grads, own.inner, params, **extra_args)
    inner = jax.tree.map(lambda new, old, h: jnp.where(h, old, new),
                         inner, own.inner, held(inner, slow_now))
    if timetable.period == 1:
      return steps, own._replace(inner=inner)

    def redraw():
      cycle = count // timetable.period
      slow = _draw_slow(own.key, cycle, fraction, params)
      weights = optax.apply_updates(params, steps)
      return slow, jax.tree.map(
          lambda s, w: jnp.where(s, w, jnp.zeros_like(w)), slow, weights)

    slow, slow_values = jax.lax.cond(
        fast_step, lambda: (own.slow, own.slow_values), redraw)
    next_fast = (count + 1) % timetable.period != 0
    # Updates that land exactly: p + (-p) = 0 to zero a weight, 0 + v = v to
    # put it back.
    updates = jax.tree.map(
        lambda u, p, s_now, s, v: jnp.where(
            s & next_fast, -p, jnp.where(s_now, v, u)).astype(u.dtype),
        steps, params, slow_now, slow, own.slow_values)
    return updates, own._replace(slow=slow, slow_values=slow_values,
                                 inner=inner)

  def groups(count, active):
    del active  # One group, always active.
    return {ALL: optax.GradientTransformationExtraArgs(
        init_fn, functools.partial(update_fn, count))}

  return timetabled(
      timetable, labels=lambda params: (ALL,) * len(jax.tree.leaves(params)),
      groups=groups)


def random_subgroups_state(opt_state: PyTree) -> RandomSubgroupsState:
  """The :class:`RandomSubgroupsState` in the state of :func:`random_subgroups`.

  Args:
    opt_state: the optimizer state, alone or inside ``optax.chain`` and other
      wrappers.

  Raises:
    ValueError: if its timetable is not that of :func:`random_subgroups`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), mo.random_subgroups(
    ...     optax.sgd(0.1), fraction=0.5, period=2, key=jax.random.key(0)))
    >>> subgroups = mo.random_subgroups_state(tx.init({'w': jnp.ones(4)}))
    >>> subgroups.slow['w'].tolist()  # none drawn before the first full step
    [False, False, False, False]
  """
  timetable_state = find_timetable_state(opt_state)
  if not isinstance(timetable_state.timetable, RandomSubgroupsTimetable):
    raise ValueError(
        "the optimizer state's timetable is not random_subgroups' "
        f"({timetable_state.timetable!r}).")
  return timetable_state.inner.inner_states[ALL].inner_state


def full_weights(params: PyTree, opt_state: PyTree) -> PyTree:
  """The weights with the slow subgroup's values in place of the zeros.

  Between a full step and the end of its cycle, the parameters that
  :func:`random_subgroups` produces hold zeros for the slow weights; use this
  to evaluate or save the model.

  Args:
    params: the parameters after a step.
    opt_state: the optimizer state after the same step.

  Returns:
    The parameters with every weight's value.

  Example:
    A full step, then a fast step of a cycle of three: the fast weights took
    two steps, the slow ones one, and the parameters hold zeros for the slow
    ones until the cycle ends.

    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> tx = mo.random_subgroups(optax.sgd(0.1), fraction=0.5, period=3,
    ...                          key=jax.random.key(0))
    >>> params = {'w': jnp.ones(6)}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({'w': jnp.ones(6)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(w), 4) for w in params['w']]
    [0.0, 0.8, 0.0, 0.8, 0.0, 0.0]
    >>> [round(float(w), 4) for w in mo.full_weights(params, state)['w']]
    [0.9, 0.8, 0.9, 0.8, 0.9, 0.9]
  """
  own = random_subgroups_state(opt_state)
  timetable_state = find_timetable_state(opt_state)
  zeroed = jnp.logical_not(
      timetable_state.timetable.is_full_step(timetable_state.count))
  return jax.tree.map(lambda p, s, v: jnp.where(s & zeroed, v, p),
                      params, own.slow, own.slow_values)
