"""Loss scaling for float16 in the NNX step: Flax's DynamicScale, as its examples use it.

The reference is the train step of Flax's ImageNet example written by hand on
the split model (as tests/linen/test_half_precision.py does for Linen):
``dynamic_scale.value_and_grad`` of the full loss, the optimizer's update,
and on a non-finite step the new parameters and optimizer state replaced by
the old ones with ``jnp.where(is_fin, ...)``; the BatchNorm statistics are
the forward pass's either way.
"""

import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.dynamic_scale import DynamicScale

import multirate_optax as mo

PERIOD, STEPS, NAN_AT = 2, 7, (2, 5)  # steps 2 (slow) and 5 (fast) see a NaN
HEAD = nnx.PathContains("head")


class Net(nnx.Module):
  """Linear -> BatchNorm -> relu -> head, computing in float16."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.body = nnx.Linear(5, 16, dtype=jnp.float16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.9, dtype=jnp.float16, rngs=rngs)
    self.head = nnx.Linear(16, 3, dtype=jnp.float16, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.body(x))))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      model(x).astype(jnp.float32), y).mean()


def make_batches():
  rng = np.random.default_rng(0)
  data = []
  for t in range(STEPS):
    x = rng.normal(size=(8, 5)).astype(np.float32)
    if t in NAN_AT:
      x[3, 1] = np.nan
    data.append((jnp.asarray(x), jnp.asarray(rng.integers(0, 3, 8))))
  return data


def make_tx(labels):
  return mo.multirate(optax.sgd(0.1, momentum=0.9), labels=labels,
                      period=PERIOD)


GRAPHDEF, PARAMS, STATS = nnx.split(Net(), nnx.Param, nnx.BatchStat)
REFERENCE_TX = make_tx(mo.fast_by_path("^head/"))


def model_at(pure_params, stats):
  state = jax.tree.map(lambda x: x, PARAMS)  # fresh Variables
  nnx.replace_by_pure_dict(state, pure_params)
  return nnx.merge(GRAPHDEF, state, jax.tree.map(lambda x: x, stats))


def with_timetable_count_advanced(opt_state):
  return jax.tree.map(
      lambda n: dataclasses.replace(n, count=n.count + 1)
      if isinstance(n, mo.TimetableState) else n,
      opt_state, is_leaf=lambda n: isinstance(n, mo.TimetableState))


@functools.partial(jax.jit, static_argnums=6)
def example_step(params, stats, opt_state, dynamic_scale, x, y,
                 count_advances_on_skip):
  """Flax's ImageNet train_step (its dynamic-scale branch), by hand."""

  def loss(params):
    model = model_at(params, stats)
    return loss_fn(model, x, y), nnx.state(model, nnx.BatchStat)

  dynamic_scale, is_fin, (_, new_stats), grads = dynamic_scale.value_and_grad(
      loss, has_aux=True)(params)
  updates, new_opt_state = REFERENCE_TX.update(grads, opt_state, params)
  kept_opt_state = (with_timetable_count_advanced(opt_state)
                    if count_advances_on_skip else opt_state)
  where = functools.partial(jax.tree.map, functools.partial(jnp.where, is_fin))
  return (where(optax.apply_updates(params, updates), params), new_stats,
          where(new_opt_state, kept_opt_state), dynamic_scale)


def pure_params(model):
  return jax.tree.map(np.asarray,
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def timetable_count(optimizer):
  return int(mo.find_timetable_state(nnx.as_pure(optimizer.opt_state)).count)


@pytest.fixture(scope="module")
def reference():
  out = {}
  for advances in (False, True):
    params = nnx.to_pure_dict(PARAMS)
    stats, opt_state, scale = STATS, REFERENCE_TX.init(params), DynamicScale()
    history = []
    for x, y in make_batches():
      params, stats, opt_state, scale = example_step(
          params, stats, opt_state, scale, x, y, advances)
      history.append((jax.tree.map(np.asarray, params),
                      jax.tree.map(np.asarray, nnx.to_pure_dict(stats)),
                      scale))
    out[advances] = history
  return out


def run(dispatch):
  model = Net()
  optimizer = nnx.Optimizer(model, make_tx(mo.nnx.fast_by_filter(HEAD)),
                            wrt=nnx.Param)
  step = mo.nnx.train_step(loss_fn, dispatch=dispatch, dynamic_scale=True)
  scale, history, counts = DynamicScale(), [], []
  for x, y in make_batches():
    scale, _ = step(model, optimizer, scale, x, y)
    history.append((pure_params(model), jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))), scale))
    counts.append(timetable_count(optimizer))
  return model, optimizer, history, counts


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_trajectory_matches_the_example_step(reference, dispatch):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    _, optimizer, got, counts = run(dispatch)
  # 'host' advances the timetable's count on a skipped step; 'cond' keeps it.
  want = reference[dispatch == "host"]
  for t, ((params, stats, scale), (w_params, w_stats, w_scale)) in enumerate(
      zip(got, want)):
    chex.assert_trees_all_close(params, w_params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(stats, w_stats, rtol=1e-6, atol=1e-6)
    assert int(scale.fin_steps) == int(w_scale.fin_steps), t
    assert float(scale.scale) == float(w_scale.scale), t
  assert float(got[-1][2].scale) == 2.0 ** 14  # two skipped steps
  assert int(got[-1][2].fin_steps) == STEPS - 1 - NAN_AT[-1]
  assert int(optimizer.step[...]) == STEPS  # as Flax's apply_gradients
  # 'cond' retries a skipped step's phase: steps 2 and 5 keep their count.
  assert counts == ([1, 2, 2, 3, 4, 4, 5] if dispatch == "cond"
                    else list(range(1, STEPS + 1)))


def test_nan_step_keeps_params_and_optimizer_state_and_halves_the_scale():
  model = Net()
  optimizer = nnx.Optimizer(model, make_tx(mo.nnx.fast_by_filter(HEAD)),
                            wrt=nnx.Param)
  step = mo.nnx.train_step(loss_fn, dispatch="cond", dynamic_scale=True)
  data = make_batches()
  scale, _ = step(model, optimizer, DynamicScale(), *data[0])
  params = pure_params(model)
  opt_state = [np.asarray(x) for x in jax.tree.leaves(optimizer.opt_state)]
  new_scale, loss = step(model, optimizer, scale, *data[NAN_AT[0]])
  chex.assert_trees_all_equal(pure_params(model), params)
  chex.assert_trees_all_equal(
      [np.asarray(x) for x in jax.tree.leaves(optimizer.opt_state)], opt_state)
  assert float(new_scale.scale) == float(scale.scale) / 2
  assert int(new_scale.fin_steps) == 0 and np.isnan(float(loss))


def test_host_warns_when_a_slow_step_is_skipped():
  with pytest.warns(RuntimeWarning, match=r"step 2 had non-finite gradients"
                    r".*groups \['slow'\] miss"):
    run("host")
    jax.effects_barrier()


def test_a_dynamic_scale_the_step_was_not_built_for_is_refused():
  model = Net()
  optimizer = nnx.Optimizer(model, make_tx(mo.nnx.fast_by_filter(HEAD)),
                            wrt=nnx.Param)
  x, y = make_batches()[0]
  plain = mo.nnx.train_step(lambda model, scale, x, y: loss_fn(model, x, y))
  with pytest.raises(TypeError, match=r"argument 3 .* is a DynamicScale.*"
                     r"dynamic_scale=True"):
    plain(model, optimizer, DynamicScale(), x, y)
  scaled = mo.nnx.train_step(loss_fn, dynamic_scale=True)
  with pytest.raises(TypeError, match=r"dynamic_scale=True is called as "
                     r"dynamic_scale, value = step\(model, optimizer, "
                     r"dynamic_scale.*got an array of shape \(8, 5\)"):
    scaled(model, optimizer, x, y)


def test_apply_inside_nnx_jit_takes_the_scale(reference):
  model = Net()
  optimizer = nnx.Optimizer(model, make_tx(mo.nnx.fast_by_filter(HEAD)),
                            wrt=nnx.Param)
  step = mo.nnx.train_step(loss_fn, dispatch="cond", dynamic_scale=True)
  jitted = nnx.jit(step.apply)
  scale = DynamicScale()
  for x, y in make_batches():
    scale, _ = jitted(model, optimizer, scale, x, y)
  params, _, want_scale = reference[False][-1]
  chex.assert_trees_all_close(pure_params(model), params, rtol=1e-6,
                              atol=1e-6)
  assert int(scale.fin_steps) == int(want_scale.fin_steps)
  assert float(scale.scale) == float(want_scale.scale)


@pytest.mark.parametrize("dispatch", ["host", "cond"])
def test_graph_node_arguments_after_the_scale(dispatch):
  # Graph nodes (dropout rngs, a metric) after the DynamicScale: carried as
  # without loss scaling. In float32 a power-of-two scale is exact, so the
  # scaled step's trajectory, rng count and metric equal the unscaled step's
  # (itself checked against a hand-written nnx loop in tests/nnx/test_nnx.py).
  class Dropped(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.body = nnx.Linear(5, 16, rngs=rngs)
      self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x, rngs):
      return self.head(nnx.Dropout(0.5)(nnx.relu(self.body(x)), rngs=rngs))

  def dropout_loss(model, x, y, rngs, metric):
    loss = optax.softmax_cross_entropy_with_integer_labels(
        model(x, rngs), y).mean()
    metric.update(values=loss)
    return loss

  batches = [(jnp.nan_to_num(x), y) for x, y in make_batches()]
  runs = []
  for scaled in (False, True):
    model = Dropped()
    optimizer = nnx.Optimizer(model, make_tx(mo.nnx.fast_by_filter(HEAD)),
                              wrt=nnx.Param)
    rngs, metric = nnx.Rngs(dropout=3), nnx.metrics.Average()
    step = mo.nnx.train_step(dropout_loss, dispatch=dispatch,
                             dynamic_scale=scaled)
    scale = DynamicScale()
    for x, y in batches:
      if scaled:
        scale, _ = step(model, optimizer, scale, x, y, rngs, metric)
      else:
        step(model, optimizer, x, y, rngs, metric)
    runs.append((nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 int(rngs.dropout.count[...]), float(metric.compute())))
    if scaled:
      assert int(scale.fin_steps) == len(batches)
  assert runs[1][1:] == runs[0][1:] == (len(batches), runs[0][2])
  chex.assert_trees_all_equal(runs[1][0], runs[0][0])
