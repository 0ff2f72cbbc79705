"""Layer-wise learning-rate decay against a hand-written loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import HEAD_FAST, batches, mlp_loss, mlp_params

DEPTHS = {"layer0": 2, "layer1": 1, "head": 0}


def test_sgd_momentum_matches_a_hand_written_loop():
  decay, lr, mu = 0.65, 0.1, 0.9
  tx = optax.chain(optax.sgd(lr, momentum=mu),
                   mo.layerwise_decay(decay, depths=DEPTHS))
  params = mlp_params()
  opt_state = tx.init(params)
  want = jax.tree.map(np.asarray, params)
  momentum = jax.tree.map(np.zeros_like, want)
  step = jax.jit(lambda p, s, b: (lambda g: (lambda u, s: (
      optax.apply_updates(p, u), s))(*tx.update(g, s, p)))(
          jax.grad(mlp_loss)(p, b)))
  for batch in batches(6):
    grads = jax.tree.map(np.asarray, jax.grad(mlp_loss)(
        jax.tree.map(jnp.asarray, want), batch))
    for name, depth in DEPTHS.items():
      for leaf in want[name]:
        momentum[name][leaf] = mu * momentum[name][leaf] + grads[name][leaf]
        want[name][leaf] = (want[name][leaf]
                            - lr * decay ** depth * momentum[name][leaf])
    params, opt_state = step(params, opt_state, batch)
  for name in DEPTHS:
    for leaf in want[name]:
      np.testing.assert_allclose(params[name][leaf], want[name][leaf],
                                 rtol=1e-5, atol=1e-6)


def test_depth_zero_is_untouched_and_decay_one_is_identity():
  grads = jax.tree.map(jnp.ones_like, mlp_params())
  tx = mo.layerwise_decay(0.5, depths=DEPTHS)
  out, _ = tx.update(grads, tx.init(grads), grads)
  assert out["head"]["w"] is grads["head"]["w"]
  np.testing.assert_array_equal(out["layer0"]["w"], 0.25)
  same = mo.layerwise_decay(1.0, depths=DEPTHS)
  out, _ = same.update(grads, same.init(grads), grads)
  jax.tree.map(np.testing.assert_array_equal, out, grads)


def test_composes_with_multirate_groups():
  # Inside the slow group's optimizer: the slow layers' single update per
  # cycle is scaled by depth, the head's (fast, depth 0) is not.
  params = mlp_params()
  slow = optax.chain(optax.sgd(0.1), mo.layerwise_decay(0.5, depths=DEPTHS))
  tx = mo.multirate(optax.sgd(0.1), slow, labels=HEAD_FAST, period=2,
                    drift=False)
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  opt_state = tx.init(params)
  batch = batches(1)[0]
  grads = jax.grad(mlp_loss)(params, batch)
  new, opt_state, _ = step(params, opt_state, batch)
  for name, depth in DEPTHS.items():
    np.testing.assert_allclose(
        new[name]["w"], params[name]["w"] - 0.1 * 0.5 ** depth
        * grads[name]["w"], rtol=1e-5, atol=1e-7)


def test_depths_by_module_and_by_path():
  params = mlp_params()
  assert mo.depths_by_module(params) == DEPTHS
  by_path = mo.depths_by_path(lambda path: DEPTHS[path.split("/")[0]])
  tx = mo.layerwise_decay(0.5, depths=by_path)
  grads = jax.tree.map(jnp.ones_like, params)
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(out["layer1"]["b"], 0.5)


@pytest.mark.parametrize("decay", [0.0, 1.5, -0.1])
def test_bad_decays_are_refused(decay):
  with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
    mo.layerwise_decay(decay, depths=DEPTHS)


def test_bad_depths_name_the_leaf():
  params = mlp_params()
  with pytest.raises(ValueError, match=r"'layer1/.*' has depth -1"):
    mo.layerwise_decay(0.5, depths={**DEPTHS, "layer1": -1}).init(params)
  with pytest.raises(ValueError, match="depths do not match the structure"):
    mo.layerwise_decay(0.5, depths={"layer0": 1, "head": 0}).init(params)
