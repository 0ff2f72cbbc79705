"""Random subgroups: subgroup draws, zeroed forward pass on fast steps, full steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import batches, mlp_loss, mlp_params
from _probes import count_compilations

LR, MU = 0.1, 0.9


def run(tx, params, data, dispatch="host"):
  """Trains with the train step.

  Returns, after every step: the parameters the loss saw, the full weights,
  and the slow subgroup and optimizer state.
  """

  def loss_fn(params, batch):
    return mlp_loss(params, batch), params

  step = mo.train_step(loss_fn, tx, has_aux=True, dispatch=dispatch)
  opt_state = tx.init(params)
  seen, full, states = [], [], []
  for batch in data:
    params, opt_state, (_, used) = step(params, opt_state, batch)
    seen.append(jax.tree.map(np.array, used))
    full.append(jax.tree.map(np.array, mo.full_weights(params, opt_state)))
    own = mo.random_subgroups_state(opt_state)
    states.append(jax.tree.map(np.array, (own.slow, own.inner)))
  return seen, full, states


def reference(params, data, slow_masks, period):
  """SGD with momentum, the slow weights zeroed and held on fast steps.

  ``slow_masks[c]`` is the slow subgroup of cycle c. Step t is full when
  t % period == 0: the loss sees every weight and all of them move. Otherwise
  the loss sees the slow weights as zeros, and only the fast weights and their
  momenta change.
  """
  grad_fn = jax.jit(jax.grad(mlp_loss))
  theta = jax.tree.map(lambda p: np.asarray(p, np.float32), params)
  buf = jax.tree.map(np.zeros_like, theta)
  seen, history = [], []
  for t, batch in enumerate(data):
    if t % period == 0:
      fast = jax.tree.map(lambda p: np.ones(p.shape, bool), theta)
    else:
      fast = jax.tree.map(np.logical_not, slow_masks[t // period])
    used = jax.tree.map(lambda p, f: np.where(f, p, np.float32(0)), theta, fast)
    grads = jax.tree.map(np.asarray, grad_fn(used, batch))
    buf = jax.tree.map(lambda b, g, f: np.where(f, np.float32(MU) * b + g, b),
                       buf, grads, fast)
    theta = jax.tree.map(lambda p, b, f: np.where(f, p - np.float32(LR) * b, p),
                         theta, buf, fast)
    seen.append(used)
    history.append(theta)
  return seen, history


@pytest.mark.parametrize("period", [2, 3])
def test_follows_the_reference_loop(period):
  data = batches(10)
  tx = mo.random_subgroups(optax.sgd(LR, momentum=MU), fraction=0.4,
                           period=period, key=jax.random.key(3))
  seen, full, states = run(tx, mlp_params(), data)
  # The subgroup drawn on the full step of cycle c is the one of its fast steps.
  masks = [states[c * period][0] for c in range(len(data) // period + 1)
           if c * period < len(data)]
  want_seen, want = reference(mlp_params(), data, masks, period)
  chex.assert_trees_all_close(full, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(seen, want_seen, rtol=1e-5, atol=1e-6)


def test_fast_steps_see_exact_zeros_and_leave_slow_weights_untouched():
  period = 3
  tx = mo.random_subgroups(optax.sgd(LR, momentum=MU), fraction=0.5,
                           period=period, key=jax.random.key(0))
  seen, full, states = run(tx, mlp_params(), batches(9))
  for t in range(9):
    slow = states[t - t % period][0]
    for name in ("layer0", "layer1", "head"):
      used, mask = seen[t][name]["w"], slow[name]["w"]
      if t % period == 0:  # full step: every weight, none of them zero
        assert np.all(used != 0.0)
      else:
        assert np.all(used[mask] == 0.0) and np.all(used[~mask] != 0.0)
        # The slow weights keep the values of the full step's end.
        np.testing.assert_array_equal(full[t][name]["w"][mask],
                                      full[t - 1][name]["w"][mask])
        assert np.all(full[t][name]["w"][~mask] != full[t - 1][name]["w"][~mask])
    if t % period:  # the slow momentum is held too
      trace = lambda s: s[1][0].trace["layer0"]["w"]
      mask = slow["layer0"]["w"]
      np.testing.assert_array_equal(trace(states[t])[mask],
                                    trace(states[t - 1])[mask])


def test_subgroups_have_the_fraction_and_are_redrawn_every_period():
  period, fraction = 4, 0.3
  params = {"big": jnp.ones((200, 500)), "small": jnp.ones(7)}
  tx = mo.random_subgroups(optax.sgd(0.01), fraction=fraction, period=period,
                           key=jax.random.key(1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  masks = []
  for _ in range(12):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
    masks.append(np.array(mo.random_subgroups_state(state).slow["big"]))
  for t, mask in enumerate(masks):
    cycle_start = masks[t - t % period]
    np.testing.assert_array_equal(mask, cycle_start)
    # 100,000 draws: the standard deviation of the share is 0.0015.
    assert abs(mask.mean() - fraction) < 0.01
  assert not np.array_equal(masks[0], masks[period])
  assert not np.array_equal(masks[period], masks[2 * period])
  # Each leaf draws its own subgroup.
  assert not np.array_equal(masks[0].ravel()[:7], np.array(mo.random_subgroups_state(state).slow["small"]))


def test_the_key_in_the_state_decides_the_subgroups():
  params = mlp_params()
  grads = jax.tree.map(jnp.ones_like, params)

  def first_subgroup(key):
    tx = mo.random_subgroups(optax.sgd(0.01), fraction=0.5, period=2, key=key)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return mo.random_subgroups_state(state).slow

  chex.assert_trees_all_equal(first_subgroup(jax.random.key(5)),
                              first_subgroup(jax.random.key(5)))
  assert not np.array_equal(first_subgroup(jax.random.key(5))["layer0"]["w"],
                            first_subgroup(jax.random.key(6))["layer0"]["w"])


@pytest.mark.parametrize("fraction, zero_share", [(0.0, 0.0), (1.0, 1.0)])
def test_fraction_extremes(fraction, zero_share):
  tx = mo.random_subgroups(optax.sgd(LR), fraction=fraction, period=2,
                           key=jax.random.key(0))
  seen, _, _ = run(tx, mlp_params(), batches(2))
  assert np.mean(seen[1]["layer1"]["w"] == 0.0) == zero_share


def test_period_one_is_plain_training_bitwise():
  data = batches(6)
  plain = optax.sgd(LR, momentum=MU)

  @jax.jit
  def plain_step(params, opt_state, batch):
    grads = jax.grad(mlp_loss)(params, batch)
    updates, opt_state = plain.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = mlp_params(), plain.init(mlp_params())
  want = []
  for batch in data:
    params, opt_state = plain_step(params, opt_state, batch)
    want.append(params)
  tx = mo.random_subgroups(optax.sgd(LR, momentum=MU), fraction=0.5, period=1,
                           key=jax.random.key(0))
  _, got, _ = run(tx, mlp_params(), data)
  chex.assert_trees_all_equal(got, want)


def test_adam_moments_of_slow_weights_are_held():
  params = mlp_params()
  tx = mo.random_subgroups(optax.adam(1e-2), fraction=0.5, period=3,
                           key=jax.random.key(0))
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = update(grads, state, params)  # full step: draws a subgroup
  params = optax.apply_updates(params, updates)
  slow = mo.random_subgroups_state(state).slow["head"]["w"]
  before = mo.random_subgroups_state(state).inner[0]
  updates, state = update(grads, state, params)  # fast step
  after = mo.random_subgroups_state(state).inner[0]
  for moment in ("mu", "nu"):
    old = getattr(before, moment)["head"]["w"]
    new = getattr(after, moment)["head"]["w"]
    np.testing.assert_array_equal(new[slow], old[slow])
    assert np.all(new[~slow] != old[~slow])


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_one_program_whatever_the_step(dispatch):
  tx = mo.random_subgroups(optax.sgd(LR), fraction=0.5, period=3,
                           key=jax.random.key(0))
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  data = batches(7)
  with count_compilations() as compiled:
    for batch in data:
      params, opt_state, _ = step(params, opt_state, batch)
  assert compiled[0] == 1


def test_bad_input():
  with pytest.raises(ValueError, match="fraction must be in"):
    mo.random_subgroups(optax.sgd(LR), fraction=1.5, period=2,
                        key=jax.random.key(0))
  tx = mo.random_subgroups(optax.sgd(LR), fraction=0.5, period=2,
                           key=jax.random.key(0))
  params = mlp_params()
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
