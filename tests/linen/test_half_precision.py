"""Loss scaling for float16: Flax's DynamicScale in the Linen and core steps.

The reference is the train step of Flax's ImageNet example (examples/imagenet/
train.py), written out by hand: ``dynamic_scale.value_and_grad`` of the full
loss, ``state.apply_gradients``, and on a non-finite step the new parameters
and optimizer state replaced by the old ones with ``jnp.where(is_fin, ...)``.
"""

import dataclasses
import functools
import warnings
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state

import multirate_optax as mo

PERIOD, STEPS, NAN_AT = 2, 7, (2, 5)  # steps 2 (slow) and 5 (fast) see a NaN


class Net(nn.Module):
  """Dense -> BatchNorm -> relu -> head, computing in float16."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(16, dtype=jnp.float16, name="body")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     dtype=jnp.float16, name="norm")(x)
    return nn.Dense(3, dtype=jnp.float16, name="head")(nn.relu(x))


class ExampleState(train_state.TrainState):
  """The ImageNet example's TrainState subclass, field for field."""
  batch_stats: Any
  dynamic_scale: dynamic_scale_lib.DynamicScale


def loss_fn(params, batch_stats, batch):
  x, y = batch
  logits, updates = Net().apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()
  return loss, updates["batch_stats"]


def make_batches():
  rng = np.random.default_rng(0)
  data = []
  for t in range(STEPS):
    x = rng.normal(size=(8, 5)).astype(np.float32)
    if t in NAN_AT:
      x[3, 1] = np.nan
    data.append((jnp.asarray(x), jnp.asarray(rng.integers(0, 3, 8))))
  return data


def initial_state():
  variables = Net().init(jax.random.key(0), jnp.ones((1, 5)), train=False)
  tx = mo.multirate(optax.sgd(0.1, momentum=0.9),
                    labels=mo.fast_by_path("^head/"), period=PERIOD)
  return ExampleState.create(
      apply_fn=Net().apply, params=variables["params"], tx=tx,
      batch_stats=variables["batch_stats"],
      dynamic_scale=dynamic_scale_lib.DynamicScale())


def with_timetable_count_advanced(opt_state):
  return jax.tree.map(
      lambda n: dataclasses.replace(n, count=n.count + 1)
      if isinstance(n, mo.TimetableState) else n,
      opt_state, is_leaf=lambda n: isinstance(n, mo.TimetableState))


@functools.partial(jax.jit, static_argnums=2)
def example_train_step(state, batch, count_advances_on_skip=False):
  """Flax's ImageNet train_step (its dynamic-scale branch), by hand."""
  dynamic_scale = state.dynamic_scale
  grad_fn = dynamic_scale.value_and_grad(
      lambda params: loss_fn(params, state.batch_stats, batch), has_aux=True)
  dynamic_scale, is_fin, (loss, new_batch_stats), grads = grad_fn(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
  kept_opt_state = (with_timetable_count_advanced(state.opt_state)
                    if count_advances_on_skip else state.opt_state)
  return new_state.replace(
      opt_state=jax.tree.map(functools.partial(jnp.where, is_fin),
                             new_state.opt_state, kept_opt_state),
      params=jax.tree.map(functools.partial(jnp.where, is_fin),
                          new_state.params, state.params),
      dynamic_scale=dynamic_scale), loss


def run(step, state):
  history = []
  for batch in make_batches():
    state, _ = step(state, batch)
    history.append(state)
  return history


@pytest.fixture(scope="module")
def reference():
  return {advances: run(lambda s, b: example_train_step(s, b, advances),
                        initial_state())
          for advances in (False, True)}


def test_nan_step_keeps_params_and_optimizer_state_and_halves_the_scale():
  state = initial_state()
  step = mo.linen.train_step(loss_fn, dispatch="cond")
  before, _ = step(state, make_batches()[0])  # a NaN-free first step
  x, y = make_batches()[NAN_AT[0]]
  after, _ = step(before, (x, y))
  want, _ = example_train_step(before, (x, y))
  for got in (after, want):
    chex.assert_trees_all_equal(got.params, before.params)
    chex.assert_trees_all_equal(got.opt_state, before.opt_state)
    assert float(got.dynamic_scale.scale) == float(before.dynamic_scale.scale) / 2
    assert int(got.dynamic_scale.fin_steps) == 0
  assert after.step == before.step + 1  # as Flax's apply_gradients


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_trajectory_matches_the_example_step(reference, dispatch):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    got = run(mo.linen.train_step(loss_fn, dispatch=dispatch), initial_state())
  # 'host' advances the timetable's count on a skipped step; 'cond' keeps it.
  want = reference[dispatch == "host"]
  for t, (g, w) in enumerate(zip(got, want)):
    chex.assert_trees_all_close(g.params, w.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(g.opt_state, w.opt_state, rtol=1e-6,
                                atol=1e-6)
    assert int(g.dynamic_scale.fin_steps) == int(w.dynamic_scale.fin_steps), t
    assert float(g.dynamic_scale.scale) == float(w.dynamic_scale.scale), t
  # Two skipped steps: the scale halved twice, fin_steps counted from the last.
  assert float(got[-1].dynamic_scale.scale) == 2.0 ** 14
  assert int(got[-1].dynamic_scale.fin_steps) == STEPS - 1 - NAN_AT[-1]


def slow_moved(history):
  return [not np.array_equal(a.params["body"]["kernel"],
                             b.params["body"]["kernel"])
          for a, b in zip(history, history[1:])]


def test_cond_retries_a_skipped_slow_step():
  history = run(mo.linen.train_step(loss_fn, dispatch="cond"),
                initial_state())
  counts = [int(mo.find_timetable_state(s.opt_state).count) for s in history]
  # Step 2 (slow) is skipped: its count stays 2, so step 3 is the slow step;
  # step 5 (fast) is skipped too, and the cycle shifts once more.
  assert counts == [1, 2, 2, 3, 4, 4, 5]
  # Without drift the slow kernel moves on slow steps only: 3 (the retried
  # one) and 6 (count 4); with drift it would move on every applied step.
  tx = mo.multirate(optax.sgd(0.1, momentum=0.9), drift=False,
                    labels=mo.fast_by_path("^head/"), period=PERIOD)
  state = initial_state()
  state = state.replace(tx=tx, opt_state=tx.init(state.params))
  no_drift = run(mo.linen.train_step(loss_fn, dispatch="cond"), state)
  assert slow_moved(no_drift) == [False, False, True, False, False, True]


def test_host_counts_a_skipped_step_and_warns_for_the_slow_one():
  step = mo.linen.train_step(loss_fn, dispatch="host")
  with pytest.warns(RuntimeWarning, match=r"step 2 had non-finite gradients"
                    r".*groups \['slow'\] miss"):
    history = run(step, initial_state())
    jax.effects_barrier()
  counts = [int(mo.find_timetable_state(s.opt_state).count) for s in history]
  assert counts == list(range(1, STEPS + 1))


def test_host_warns_for_a_skipped_slow_step_only():
  state = initial_state()
  step = mo.linen.train_step(loss_fn, dispatch="host")
  data = make_batches()
  state, _ = step(state, data[0])
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    state, _ = step(state, data[NAN_AT[1]])  # step 1, fast: nothing missed
    jax.effects_barrier()
  assert float(state.dynamic_scale.scale) == 2.0 ** 15


def test_no_dynamic_scale_field_or_none_trains_in_full_precision():
  state = initial_state().replace(dynamic_scale=None)
  step = mo.linen.train_step(loss_fn, dispatch="cond")
  state, _ = step(state, make_batches()[NAN_AT[0]])
  # Without a loss scale a NaN batch is applied, as Flax's step would.
  assert np.isnan(np.asarray(state.params["head"]["kernel"])).all()


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_core_step_takes_the_dynamic_scale(reference, dispatch):
  state = initial_state()
  step = mo.train_step(loss_fn, state.tx, has_aux=True, dispatch=dispatch,
                       dynamic_scale=True)
  params, opt_state, batch_stats = (state.params, state.opt_state,
                                    state.batch_stats)
  scale = state.dynamic_scale
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    for batch in make_batches():
      params, opt_state, scale, (_, batch_stats) = step(
          params, opt_state, scale, batch_stats, batch)
  want = reference[dispatch == "host"][-1]
  chex.assert_trees_all_close(params, want.params, rtol=1e-6, atol=1e-6)
  assert int(scale.fin_steps) == int(want.dynamic_scale.fin_steps)
  assert float(scale.scale) == float(want.dynamic_scale.scale)
