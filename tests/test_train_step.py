"""The compiled train step: trajectories, restricted backward pass, dispatch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _probes import count_compilations, count_host_reads, hlo_op_count
from _models import HEAD_FAST, batches, is_fast, mlp_loss, mlp_params
from _reference import multirate_sgd

H, MU, STEPS = 0.2, 0.9, 22


def train(step, params, opt_state, data):
  history = []
  for batch in data:
    params, opt_state, _ = step(params, opt_state, batch)
    history.append(jax.tree.map(np.array, params))  # before it is donated
  return history, opt_state


def multirate_sgd_tx(period, drift=False):
  return mo.multirate(optax.sgd(H / period, momentum=MU), labels=HEAD_FAST,
                      period=period, drift=drift)


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("period", [3, 5])
def test_cond_and_host_follow_the_published_algorithm(period, drift):
  data = batches(STEPS)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=period, drift=drift, is_fast=is_fast)
  results = {}
  for dispatch in ("cond", "host"):
    tx = multirate_sgd_tx(period, drift)
    params = mlp_params()
    step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
    results[dispatch], _ = train(step, params, tx.init(params), data)
    chex.assert_trees_all_close(results[dispatch], expected, rtol=1e-5, atol=1e-6)
  # Both dispatch modes run the same per-phase computation.
  chex.assert_trees_all_equal(results["cond"], results["host"])


@pytest.mark.parametrize("dispatch", ["cond", "host"])
@pytest.mark.parametrize("make_inner", [
    lambda: optax.sgd(0.05, momentum=0.9), lambda: optax.adam(1e-2)])
def test_period_one_is_plain_optax_training_bitwise(dispatch, make_inner):
  data = batches(10)
  tx = make_inner()

  @jax.jit
  def plain_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = mlp_params()
  want, _ = train(plain_step, params, tx.init(params), data)
  multi = mo.multirate(make_inner(), labels=HEAD_FAST, period=1)
  params = mlp_params()
  got, _ = train(mo.train_step(mlp_loss, multi, dispatch=dispatch), params,
                 multi.init(params), data)
  chex.assert_trees_all_equal(got, want)


def test_fast_program_has_no_backward_work_for_slow_layers():
  params = mlp_params()
  tx = multirate_sgd_tx(4)
  opt_state = tx.init(params)
  batch = batches(1)[0]
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  full = step.program(params, opt_state, batch, phase=0)
  fast = step.program(params, opt_state, batch, phase=1)
  # 3 layers: forward 3 dots; full backward 3 weight grads + 2 input grads;
  # head-only backward 1 weight grad.
  assert hlo_op_count(full, "dot") == 8
  assert hlo_op_count(fast, "dot") == 4
  full_flops = full.compile().cost_analysis()["flops"]
  fast_flops = fast.compile().cost_analysis()["flops"]
  assert fast_flops < 0.75 * full_flops


def test_cond_program_holds_both_branches_and_picks_one():
  params = mlp_params()
  tx = multirate_sgd_tx(4)
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch="cond")
  text = step.program(params, opt_state, batches(1)[0]).compile().as_text()
  assert "conditional(" in text


@pytest.mark.parametrize("dispatch, programs", [("cond", 1), ("host", 2)])
def test_compiles_once_per_program_and_never_again(dispatch, programs):
  tx = multirate_sgd_tx(3)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  data = batches(12)
  with count_compilations() as compiled:
    params, opt_state, _ = step(params, opt_state, data[0])
    params, opt_state, _ = step(params, opt_state, data[1])
    after_two = compiled[0]
    for batch in data[2:]:
      params, opt_state, _ = step(params, opt_state, batch)
  assert after_two >= programs
  assert compiled[0] == after_two


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_no_device_to_host_transfer_per_step(dispatch):
  tx = multirate_sgd_tx(3)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  data = batches(9)
  for batch in data[:2]:  # compile both programs
    params, opt_state, _ = step(params, opt_state, batch)
  with count_host_reads() as reads, jax.transfer_guard_device_to_host("disallow"):
    for batch in data[2:]:
      params, opt_state, loss = step(params, opt_state, batch)
  assert reads[0] == 0
  assert np.isfinite(float(loss))


def test_buffers_are_donated():
  tx = multirate_sgd_tx(2)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  new_params, _, _ = step(params, opt_state, batches(1)[0])
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_params))


def test_host_counter_follows_a_state_it_did_not_return():
  data = batches(8)
  tx = multirate_sgd_tx(4)
  params = mlp_params()
  cond_step = mo.train_step(mlp_loss, tx, dispatch="cond")
  want, _ = train(cond_step, params, tx.init(params), data)
  # Three steps with one step object, the rest with a fresh 'host' one: it
  # must read the count (3, a fast step) from the state it is given.
  params = mlp_params()
  first, opt_state = train(mo.train_step(mlp_loss, tx, dispatch="cond"),
                           params, tx.init(params), data[:3])
  rest, _ = train(mo.train_step(mlp_loss, tx, dispatch="host"),
                  first[-1], opt_state, data[3:])
  chex.assert_trees_all_equal(first + rest, want)


def test_in_chain_with_clipping_follows_the_reference():
  # On fast steps only the fast gradients exist, so the clipping norm is
  # theirs; on slow steps it is the norm of all gradients.
  data = batches(STEPS)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=4, drift=False, is_fast=is_fast, clip_norm=0.5)
  tx = optax.chain(optax.clip_by_global_norm(0.5), multirate_sgd_tx(4))
  params = mlp_params()
  got, _ = train(mo.train_step(mlp_loss, tx), params, tx.init(params), data)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_aux_mutable_state_and_rng():
  """A loss with BatchNorm-like running statistics and a dropout rng."""

  def loss_fn(params, stats, batch, rng):
    x, y = batch
    keep = jax.random.bernoulli(rng, 0.9, x.shape)
    x = jnp.where(keep, x / 0.9, 0.0)
    new_stats = 0.9 * stats + 0.1 * jnp.mean(x, axis=0)
    loss = mlp_loss(params, (x - new_stats, y))
    return loss, {"stats": new_stats}

  for dispatch in ("cond", "host"):
    tx = multirate_sgd_tx(2)
    params = mlp_params()
    opt_state = tx.init(params)
    step = mo.train_step(loss_fn, tx, has_aux=True, dispatch=dispatch)
    stats = jnp.zeros(6)
    rng = jax.random.key(0)
    for t, batch in enumerate(batches(4)):
      params, opt_state, (loss, aux) = step(
          params, opt_state, stats, batch, jax.random.fold_in(rng, t))
      new_stats = aux["stats"]
      assert not np.array_equal(new_stats, stats)  # updated on fast steps too
      stats = new_stats
    assert np.isfinite(float(loss))


def test_scan_over_steps_with_apply():
  tx = multirate_sgd_tx(3)
  data = batches(9)
  params = mlp_params()
  want, _ = train(mo.train_step(mlp_loss, tx, dispatch="cond"), params,
                  tx.init(params), data)
  step = mo.train_step(mlp_loss, tx, dispatch="cond")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *data)

  @jax.jit
  def run(params, opt_state, stacked):
    def body(carry, batch):
      params, opt_state, _ = step.apply(*carry, batch)
      return (params, opt_state), None
    return jax.lax.scan(body, (params, opt_state), stacked)[0]

  params = mlp_params()
  got, _ = run(params, tx.init(params), stacked)
  chex.assert_trees_all_close(got, want[-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dispatch", ["cond", "host"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_parameters(dispatch, dtype):
  tx = mo.multirate(optax.sgd(0.05, momentum=0.9), labels=HEAD_FAST, period=2,
                    drift=True)
  params = mlp_params(dtype=dtype)
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  losses = []
  for batch in batches(8, dtype=dtype) * 3:
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, mlp_params(dtype=dtype))
  assert losses[-1] < losses[0]


def test_auto_dispatch():
  assert mo.resolve_dispatch("auto", "cpu") == "host"
  assert mo.resolve_dispatch("auto", "gpu") == "cond"
  assert mo.resolve_dispatch("auto", "tpu") == "cond"
  assert mo.resolve_dispatch("cond", "cpu") == "cond"
  assert mo.train_step(mlp_loss, multirate_sgd_tx(2)).dispatch == (
      "host" if jax.default_backend() == "cpu" else "cond")
  with pytest.raises(ValueError, match="dispatch must be"):
    mo.train_step(mlp_loss, multirate_sgd_tx(2), dispatch="device")


class TestBadInput:

  def setup_method(self):
    self.tx = multirate_sgd_tx(2)
    self.params = mlp_params()
    self.opt_state = self.tx.init(self.params)

  @pytest.mark.parametrize("dispatch", ["cond", "host"])
  def test_loss_signature(self, dispatch):
    def loss_fn(params):
      return jnp.sum(params["head"]["w"])
    step = mo.train_step(loss_fn, self.tx, dispatch=dispatch)
    with pytest.raises(TypeError, match=r"cannot be called as loss_fn\(params, \*args\) with 1"):
      step(self.params, self.opt_state, batches(1)[0])

  def test_loss_with_aux_but_no_has_aux(self):
    step = mo.train_step(lambda p, b: (mlp_loss(p, b), {}), self.tx)
    with pytest.raises(TypeError, match="pass has_aux=True"):
      step(self.params, self.opt_state, batches(1)[0])

  def test_loss_not_scalar(self):
    step = mo.train_step(lambda p, b: mlp_loss(p, b) * jnp.ones(3), self.tx)
    with pytest.raises(TypeError, match=r"scalar loss, got an array of shape \(3,\)"):
      step(self.params, self.opt_state, batches(1)[0])

  def test_optimizer_without_schedule(self):
    tx = optax.sgd(0.1)
    step = mo.train_step(mlp_loss, tx)
    with pytest.raises(ValueError, match="holds no timetable of active groups"):
      step(self.params, tx.init(self.params), batches(1)[0])

  def test_host_dispatch_inside_apply_if_finite(self):
    tx = optax.apply_if_finite(multirate_sgd_tx(2), 3)
    step = mo.train_step(mlp_loss, tx, dispatch="host")
    with pytest.raises(ValueError, match="use dispatch='cond'"):
      step(self.params, tx.init(self.params), batches(1)[0])
    # 'cond' reads the count on the device and handles skipped steps.
    cond_step = mo.train_step(mlp_loss, tx, dispatch="cond")
    params, opt_state, _ = cond_step(self.params, tx.init(self.params),
                                     batches(1)[0])
    assert int(mo.find_timetable_state(opt_state).count) == 1

  def test_not_callable(self):
    with pytest.raises(TypeError, match="loss_fn must be callable"):
      mo.train_step(None, self.tx)
