"""Multirate training of Linen models: train state, trajectories, BatchNorm and dropout."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from flax.training import train_state

from _models import batches, is_fast, mlp_loss, mlp_params
from _reference import multirate_sgd
from _steps import (
    H, MU, NAMES, LinenHarness, LinenMLP, cross_entropy, linen_loss,
    linen_params)

MLP, mlp_loss_fn = LinenMLP, linen_loss


def as_mlp_params(params):
  return {name: {"w": np.array(params[name]["kernel"]),
                 "b": np.array(params[name]["bias"])} for name in NAMES}


def multirate_tx(period, drift=False):
  return LinenHarness(period, drift=drift).tx


def create_state(period, drift=False):
  return LinenHarness(period, drift=drift).state


def train_linen(step, state, data, key=jax.random.key(0)):
  history = []
  for t, batch in enumerate(data):
    state, _ = step(state, batch, jax.random.fold_in(key, t))
    history.append(as_mlp_params(state.params))  # before it is donated
  return history, state


def test_apply_under_scan():
  data = batches(9)
  want, _ = train_linen(mo.linen.train_step(mlp_loss_fn, dispatch="cond"),
                        create_state(3), data)
  # What lax.scan needs: one program, the phase picked on the device.
  step = mo.linen.train_step(mlp_loss_fn, dispatch="cond")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *data)

  @jax.jit
  def run(state, stacked):
    def body(state, batch_and_t):
      batch, t = batch_and_t
      state, _ = step.apply(state, batch, jax.random.fold_in(jax.random.key(0), t))
      return state, None
    return jax.lax.scan(body, state, (stacked, jnp.arange(9)))[0]

  state = run(create_state(3), stacked)
  chex.assert_trees_all_close(as_mlp_params(state.params), want[-1],
                              rtol=1e-6, atol=1e-7)
  assert int(state.step) == 9


class BatchNormNet(nn.Module):
  """Dense -> BatchNorm -> tanh -> dropout -> head."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(16, name="layer0")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8, name="norm")(x)
    x = nn.Dropout(0.3, deterministic=not train)(jnp.tanh(x))
    return nn.Dense(3, name="head")(x)


def batch_norm_loss(params, batch_stats, batch, rng):
  x, y = batch
  logits, updates = BatchNormNet().apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      mutable=["batch_stats"], rngs={"dropout": rng})
  return cross_entropy(logits, y), updates["batch_stats"]


def test_batch_norm_and_dropout_on_fast_steps():
  period = 3
  data = batches(12)
  keys = [jax.random.key(t) for t in range(len(data))]
  variables = BatchNormNet().init(jax.random.key(0), data[0][0], train=False)
  params, stats = variables["params"], variables["batch_stats"]

  # Train mode normalises with the batch's statistics, so the loss does not
  # depend on the running statistics passed in.
  expected = multirate_sgd(
      params, lambda p, b: batch_norm_loss(p, stats, b[:2], b[2])[0],
      [(x, y, k) for (x, y), k in zip(data, keys)], h=H, momentum=MU,
      period=period, drift=False, is_fast=lambda path: path.startswith("head"))
  # Running statistics as the forward pass of every step, at that step's
  # parameters, updates them.
  want_stats = stats
  for t, (batch, key) in enumerate(zip(data, keys)):
    _, want_stats = jax.jit(batch_norm_loss)(
        params if t == 0 else expected[t - 1], want_stats, batch, key)

  results = {}
  for dispatch in ("cond", "host"):
    state = mo.linen.TrainState.create(
        apply_fn=BatchNormNet().apply, params=params, batch_stats=stats,
        tx=mo.multirate(optax.sgd(H / period, momentum=MU),
                        optax.sgd(H, momentum=MU),
                        labels=mo.fast_by_path("^head/"), period=period,
                        drift=False))
    step = mo.linen.train_step(batch_norm_loss, dispatch=dispatch, donate=False)
    history, stat_history = [], []
    for batch, key in zip(data, keys):
      state, _ = step(state, batch, key)
      history.append(state.params)
      stat_history.append(state.batch_stats)
    chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(stat_history[-1], want_stats, rtol=1e-5, atol=1e-6)
    # Step 2 is a fast step: the slow BatchNorm's scale and bias stay, its
    # running statistics move.
    chex.assert_trees_all_equal(history[2]["norm"], history[1]["norm"])
    assert not np.array_equal(stat_history[2]["norm"]["mean"],
                              stat_history[1]["norm"]["mean"])
    results[dispatch] = history
  chex.assert_trees_all_equal(results["cond"], results["host"])


def batch_norm_state(period=2):
  variables = BatchNormNet().init(jax.random.key(0), batches(1)[0][0],
                                  train=False)
  return mo.linen.TrainState.create(
      apply_fn=BatchNormNet().apply, params=variables["params"],
      batch_stats=variables["batch_stats"], tx=multirate_tx(period))


def test_has_aux_returns_aux():
  def loss_fn(params, batch_stats, batch, rng):
    loss, batch_stats = batch_norm_loss(params, batch_stats, batch, rng)
    return loss, (batch_stats, {"double": 2 * loss})

  data = batches(1)
  variables = BatchNormNet().init(jax.random.key(0), data[0][0], train=False)
  state = mo.linen.TrainState.create(
      apply_fn=BatchNormNet().apply, params=variables["params"],
      batch_stats=variables["batch_stats"], tx=multirate_tx(2))
  state, (loss, aux) = mo.linen.train_step(loss_fn, has_aux=True)(
      state, data[0], jax.random.key(0))
  np.testing.assert_allclose(aux["double"], 2 * loss)


def test_flax_train_state_flow():
  """Flax's own TrainState, a loss of (params, batch), apply_gradients."""
  period, data = 3, batches(7)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=period, drift=False, is_fast=is_fast)
  params = linen_params(mlp_params())
  kept = jax.tree.map(np.array, params)
  for cls in (train_state.TrainState, mo.linen.TrainState):
    state = cls.create(apply_fn=MLP().apply, params=params,
                       tx=multirate_tx(period))
    saved = []
    step = mo.linen.train_step(lambda params, batch: mlp_loss_fn(
        params, batch, None))
    for t, batch in enumerate(data):
      if t == 4:
        # Flax's apply_gradients on full gradients, mid-cycle: the same
        # multirate update, and the step picks the phase up from the state.
        grads = jax.grad(mlp_loss_fn)(state.params, batch, None)
        state = state.apply_gradients(grads=grads)
      else:
        state, _ = step(state, batch)
      saved.append(state)
    assert int(state.step) == len(data)
    # Every state kept along the way, and the arrays given to create, are
    # still usable: the step donates nothing by default.
    chex.assert_trees_all_close([as_mlp_params(s.params) for s in saved],
                                expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(jax.tree.map(np.array, params), kept)


def test_mo_train_state_is_flax_train_state():
  state = create_state(2)
  assert isinstance(state, train_state.TrainState)
  assert state.batch_stats is None and state.step == 0


class TestBadInput:

  def test_fast_by_path_selecting_nothing_lists_the_paths(self):
    tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path("^Dense_2/"),
                      period=2)
    with pytest.raises(ValueError, match=r"no parameter is labelled 'fast'.*"
                       r"paths.*'head/bias'.*'layer0/kernel'"):
      train_state.TrainState.create(apply_fn=MLP().apply,
                                    params=linen_params(mlp_params()), tx=tx)

  def test_logits_returned_without_has_aux(self):
    step = mo.linen.train_step(lambda params, batch: (
        mlp_loss_fn(params, batch, None), jnp.zeros((8, 3))))
    with pytest.raises(TypeError, match=r"scalar loss, got a tuple of 2; if "
                       r"it returns \(loss, aux\), pass has_aux=True"):
      step(create_state(2), batches(1)[0])

  def test_logits_returned_without_has_aux_with_batch_stats(self):
    def loss_fn(params, batch_stats, batch, rng):
      x, y = batch
      logits, _ = BatchNormNet().apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      return cross_entropy(logits, y), logits

    state = batch_norm_state()
    with pytest.raises(ValueError, match=r"(?s)structure differs.*returned: an "
                       r"array of shape \(8, 3\).*build the step with has_aux=True"):
      mo.linen.train_step(loss_fn)(state, batches(1)[0], jax.random.key(0))

  @pytest.mark.parametrize("with_batch_stats", [False, True])
  def test_loss_only_where_aux_expected(self, with_batch_stats):
    if with_batch_stats:
      state, loss_fn = batch_norm_state(), lambda *args: batch_norm_loss(*args)[0]
      args = (batches(1)[0], jax.random.key(0))
      match = r"must return \(loss, \(new_batch_stats, aux\)\).*got a scalar array"
    else:
      state, loss_fn = create_state(2), lambda p, b: mlp_loss_fn(p, b, None)
      args = (batches(1)[0],)
      match = (r"must return \(loss, aux\), got a scalar array; if it "
               r"returns the loss alone, build the step with has_aux=False")
    with pytest.raises(TypeError, match=match) as error:
      mo.linen.train_step(loss_fn, has_aux=True)(state, *args)
    assert "Tracer" not in str(error.value)

  def test_optimizer_without_schedule(self):
    with pytest.raises(ValueError, match="holds no timetable of active groups"):
      mo.linen.TrainState.create(apply_fn=MLP().apply,
                                 params=linen_params(mlp_params()),
                                 tx=optax.sgd(0.1))

  def test_labels_that_do_not_fit(self):
    tx = mo.multirate(optax.sgd(0.1), labels={"head": "fast"}, period=2)
    with pytest.raises(ValueError, match="parameters without a label"):
      mo.linen.TrainState.create(apply_fn=MLP().apply,
                                 params=linen_params(mlp_params()), tx=tx)

  def test_loss_signature(self):
    step = mo.linen.train_step(lambda params, batch: 0.0)
    with pytest.raises(TypeError, match=r"cannot be called as loss_fn.*"
                       r"loss_fn\(params, batch_stats, \*args\), as the "
                       r"state has batch_stats"):
      step(batch_norm_state(), batches(1)[0], jax.random.key(0))

  def test_loss_without_batch_stats(self):
    step = mo.linen.train_step(lambda *args: batch_norm_loss(*args)[0])
    with pytest.raises(TypeError, match=r"must return \(loss, new_batch_stats\)"
                       r".*create the state without batch_stats"):
      step(batch_norm_state(), batches(1)[0], jax.random.key(0))

  def test_not_a_train_state(self):
    with pytest.raises(TypeError, match="expected a multirate_optax.linen."
                       "TrainState or Flax's"):
      mo.linen.train_step(mlp_loss_fn)(linen_params(mlp_params()),
                                       batches(1)[0])

  def test_mutable_updates_instead_of_batch_stats(self):
    def loss_fn(params, batch_stats, batch, rng):
      x, y = batch
      logits, updates = BatchNormNet().apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      return cross_entropy(logits, y), updates

    with pytest.raises(ValueError, match=r"Return updates\['batch_stats'\]"):
      mo.linen.train_step(loss_fn)(batch_norm_state(), batches(1)[0],
                                   jax.random.key(0))
