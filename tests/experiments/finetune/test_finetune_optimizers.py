"""Optimizers whose rates and decay length live in the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.finetune.optimizers import (
    adamw, cosine_decay, scale_by_rates, sgd_momentum)


def updates_of(optimizer, grads, steps, params=None):
  state = optimizer.init(params if params is not None else grads)
  out = []
  for _ in range(steps):
    update, state = optimizer.update(grads, state, params)
    out.append(update)
  return out


def test_cosine_decay_is_optax_s_schedule_with_its_length_in_the_state():
  schedule = optax.cosine_decay_schedule(1.0, 7)
  found = updates_of(cosine_decay(7), jnp.ones(()), 10)
  np.testing.assert_allclose(found, [schedule(t) for t in range(10)],
                             atol=1e-6)
  # A fractional length (a slow optimizer's steps / k) is in_slow_steps'.
  slow = optax.cosine_decay_schedule(1.0, 12)
  found = updates_of(cosine_decay(12 / 5), jnp.ones(()), 4)
  np.testing.assert_allclose(found, [slow(5 * c) for c in range(4)],
                             atol=1e-6)
  with pytest.raises(ValueError, match="positive"):
    cosine_decay(0)


def test_sgd_momentum_matches_optax_sgd_with_the_same_schedule():
  grads = {"w": jnp.array([1.0, -2.0])}
  ours = updates_of(sgd_momentum(0.1, 0.9, 6), grads, 6)
  theirs = updates_of(optax.sgd(optax.cosine_decay_schedule(0.1, 6),
                                momentum=0.9), grads, 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
               ours, theirs)


def test_adamw_rates_per_group_match_optax_adamw():
  params = {"encoder": {"w": jnp.array([0.5, -1.0])},
            "classifier": {"w": jnp.array([2.0])}}
  grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  group = lambda path: "head" if path.startswith("classifier") else "body"
  ours = updates_of(adamw({"body": 1e-3, "head": 1e-2}, group, 0.01, 5),
                    grads, 3, params)
  for name, rate in (("encoder", 1e-3), ("classifier", 1e-2)):
    theirs = updates_of(
        optax.adamw(optax.cosine_decay_schedule(rate, 5), weight_decay=0.01),
        grads[name], 3, params[name])
    for a, b in zip(ours, theirs):
      np.testing.assert_allclose(a[name]["w"], b["w"], rtol=1e-5)


def test_one_compiled_update_serves_every_rate_and_length():
  grads = {"w": jnp.ones(3)}
  traces = []

  @jax.jit
  def update(state):
    traces.append(None)
    return optimizer.update(grads, state, None)

  for rate, total in ((0.1, 5), (0.3, 50)):
    optimizer = sgd_momentum(rate, 0.0, total)
    update(optimizer.init(grads))
  assert len(traces) == 1


def test_rates_by_group_skip_masked_leaves():
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  inner = scale_by_rates({"only_b": 0.5}, lambda path: "only_" + path[0])
  optimizer = optax.partition({"keep": inner, "drop": optax.set_to_zero()},
                              {"a": "drop", "b": "keep"})
  update, = updates_of(optimizer, params, 1, params)
  np.testing.assert_array_equal(update["b"], [-0.5, -0.5])
  np.testing.assert_array_equal(update["a"], [0.0, 0.0])
