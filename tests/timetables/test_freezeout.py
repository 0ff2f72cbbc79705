"""FreezeOut: timetable values, a hand-written reference loop, frozen layers, programs."""

import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import batches, mlp_loss, mlp_params
from _probes import count_compilations

MLP_LAYERS = {"layer0": 0, "layer1": 1, "head": 2}


# Closed-form t_i = r_i ** p with r_i = t_0 + (1 - t_0) i / 4 for 5 layers, and
# ceil(t_i * 1000).
@pytest.mark.parametrize("spacing, t_0, fractions, steps", [
    ("linear", 0.5, (0.5, 0.625, 0.75, 0.875, 1.0), (500, 625, 750, 875, 1000)),
    ("squared", 0.5, (0.25, 0.390625, 0.5625, 0.765625, 1.0),
     (250, 391, 563, 766, 1000)),
    ("cubic", 0.5, (0.125, 0.244140625, 0.421875, 0.669921875, 1.0),
     (125, 245, 422, 670, 1000)),
    ("linear", 0.8, (0.8, 0.85, 0.9, 0.95, 1.0), (800, 850, 900, 950, 1000)),
    ("squared", 0.8, (0.64, 0.7225, 0.81, 0.9025, 1.0), (640, 723, 810, 903, 1000)),
    ("cubic", 0.8, (0.512, 0.614125, 0.729, 0.857375, 1.0),
     (512, 615, 729, 858, 1000)),
])
@pytest.mark.parametrize("scaled", [True, False])
def test_timetable_follows_the_formulas(spacing, t_0, fractions, steps, scaled):
  timetable = mo.FreezeOutTimetable(num_layers=5, total_steps=1000, t_0=t_0,
                                  spacing=spacing, scaled=scaled)
  np.testing.assert_allclose(timetable.freeze_fractions, fractions, rtol=1e-12)
  assert timetable.freeze_steps == steps
  factor = jax.jit(timetable.learning_rate_factor, static_argnums=0)
  for i, (t_i, s_i) in enumerate(zip(fractions, steps)):
    initial = 1 / t_i if scaled else 1.0
    for step, expected in [
        (0, initial),
        # cos(pi / 2) = 0 half-way, cos(pi / 3) = 1 / 2 a third of the way.
        (t_i * 1000 / 2, initial / 2),
        (t_i * 1000 / 3, initial * 3 / 4),
        (s_i - 1, initial / 2 * (1 + math.cos(math.pi * (s_i - 1) / (t_i * 1000)))),
        (s_i, 0.0),
        (s_i + 7, 0.0),
    ]:
      if step != int(step):
        continue
      step = int(step)
      assert timetable.learning_rate_factor(i, step) == pytest.approx(
          expected, rel=1e-12, abs=1e-12)
      assert float(factor(i, jnp.int32(step))) == pytest.approx(
          expected, rel=1e-5, abs=1e-6)
    assert timetable.learning_rate_factor(i, s_i - 1) > 0.0


def test_default_is_cubic_scaled_t0_08():
  timetable = mo.FreezeOutTimetable(num_layers=5, total_steps=1000)
  assert (timetable.spacing, timetable.scaled, timetable.t_0) == ("cubic", True, 0.8)
  assert timetable.freeze_steps[0] == 512


def test_times_follow_the_real_number_of_steps():
  # 900 steps (the reference code's 100 epochs of 900 batches, which it
  # treats as 1000 per epoch): the classifier still reaches zero at the end.
  timetable = mo.FreezeOutTimetable(num_layers=5, total_steps=900)
  assert timetable.freeze_steps == (461, 553, 657, 772, 900)
  assert timetable.learning_rate_factor(4, 899) > 0.0
  assert timetable.learning_rate_factor(4, 900) == 0.0


def test_phases_are_the_layers_not_yet_frozen():
  timetable = mo.FreezeOutTimetable(num_layers=4, total_steps=10, t_0=0.5,
                                  spacing="linear")
  # t_i = 0.5, 2/3, 5/6, 1 -> freeze steps 5, 7, 9, 10.
  assert timetable.freeze_steps == (5, 7, 9, 10)
  assert timetable.phases == (frozenset("0123"), frozenset("123"),
                             frozenset("23"), frozenset("3"), frozenset())
  expected = [0] * 5 + [1] * 2 + [2] * 2 + [3] + [4] * 3
  assert [timetable.phase(t) for t in range(13)] == expected
  traced = jax.jit(jax.vmap(timetable.phase))(jnp.arange(13))
  np.testing.assert_array_equal(traced, expected)


def test_layers_freezing_at_the_same_step_share_a_phase():
  timetable = mo.FreezeOutTimetable(num_layers=4, total_steps=2, t_0=0.5,
                                  spacing="linear")
  assert timetable.freeze_steps == (1, 2, 2, 2)
  assert timetable.phases == (frozenset("0123"), frozenset("123"), frozenset())


def freezeout_sgd_reference(params, batches, timetable, layer_of, *, lr,
                            momentum, weight_decay):
  """FreezeOut with PyTorch's SGD (Nesterov, weight decay), in numpy.

  Layer i moves with rate lr * alpha_i(t) / alpha from the closed form while
  t < ceil(t_i T); its momentum buffer changes only then.
  """
  grad_fn = jax.jit(jax.grad(mlp_loss))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [mo.path_str(p) for p, _ in flat]
  layer = {p: layer_of[p.split("/")[0]] for p in paths}
  theta = {p: np.asarray(v, np.float32) for p, (_, v) in zip(paths, flat)}
  buf = {p: np.zeros_like(v) for p, v in theta.items()}
  mu, wd = np.float32(momentum), np.float32(weight_decay)
  history = []
  for t, batch in enumerate(batches):
    current = jax.tree.unflatten(treedef, [theta[p] for p in paths])
    grads = dict(zip(paths, map(np.asarray, jax.tree.leaves(
        grad_fn(current, batch)))))
    for p in paths:
      t_i = timetable.freeze_fractions[layer[p]]
      if t >= math.ceil(round(t_i * timetable.total_steps, 6)):
        continue
      initial = lr / t_i if timetable.scaled else lr
      rate = np.float32(initial / 2 * (1 + math.cos(
          math.pi * t / (t_i * timetable.total_steps))))
      d = grads[p] + wd * theta[p]
      buf[p] = mu * buf[p] + d
      theta[p] = theta[p] - rate * (d + mu * buf[p])
    history.append(jax.tree.unflatten(treedef, [theta[p].copy() for p in paths]))
  return history


def sgd_nesterov(lr=0.1, momentum=0.9, weight_decay=1e-3):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(lr, momentum=momentum, nesterov=True))


def train(step, params, opt_state, data):
  history, states = [], []
  for batch in data:
    params, opt_state, _ = step(params, opt_state, batch)
    history.append(jax.tree.map(np.array, params))
    states.append(jax.tree.map(np.array, opt_state))
  return history, states


@pytest.mark.parametrize("spacing, scaled, dispatch", [
    ("cubic", True, "host"), ("linear", False, "cond")])
def test_training_follows_the_reference_loop(spacing, scaled, dispatch):
  timetable = mo.FreezeOutTimetable(num_layers=3, total_steps=20, t_0=0.5,
                                  spacing=spacing, scaled=scaled)
  data = batches(22)  # two steps past the end: nothing moves there
  expected = freezeout_sgd_reference(
      mlp_params(), data, timetable, MLP_LAYERS, lr=0.1, momentum=0.9,
      weight_decay=1e-3)
  tx = mo.freezeout(sgd_nesterov(), timetable, layers=MLP_LAYERS)
  params = mlp_params()
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  history, states = train(step, params, tx.init(params), data)
  chex.assert_trees_all_close(history, expected, rtol=2e-5, atol=1e-6)

  # From its freeze step on, a layer's weights and optimizer state stay
  # bitwise as they were after the step before (which still moved them).
  layer_state = lambda state, i: state.inner.inner_states[str(i)].inner_state
  for i, name in enumerate(("layer0", "layer1", "head")):
    s_i = timetable.freeze_steps[i]
    assert not np.array_equal(history[s_i - 1][name]["w"],
                              history[s_i - 2][name]["w"])
    for t in range(s_i, len(history)):
      chex.assert_trees_all_equal(history[t][name], history[s_i - 1][name])
      chex.assert_trees_all_equal(layer_state(states[t], i),
                                  layer_state(states[s_i - 1], i))


class ConvNet(nn.Module):
  """Three 3x3 convolutions and a dense classifier."""

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def conv_step():
  """A host-dispatch train step of ConvNet, its arguments, and its timetable."""
  model = ConvNet()
  x = jnp.ones((4, 8, 8, 1))
  y = jnp.zeros(4, jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  timetable = mo.FreezeOutTimetable(num_layers=4, total_steps=8, t_0=0.5,
                                  spacing="linear")
  tx = mo.freezeout(optax.sgd(0.1, momentum=0.9), timetable,
                    layers=mo.layers_by_module(params))
  step = mo.train_step(loss_fn, tx, dispatch="host")
  return step, timetable, (params, tx.init(params), x, y)


def test_later_phases_have_strictly_less_backward_work(conv_step):
  step, timetable, args = conv_step
  assert timetable.freeze_steps == (4, 6, 7, 8)
  convolutions, flops = [], []
  for phase in range(len(timetable.phases)):
    compiled = step.program(*args, phase=phase).compile()
    convolutions.append(len(re.findall(r"= \S+ convolution\(", compiled.as_text())))
    flops.append(compiled.cost_analysis()["flops"])
  # Forward 3; weight gradients of the convolutions still training; input
  # gradients only down to the first of them (none into a frozen prefix).
  assert convolutions == [3 + 3 + 2, 3 + 2 + 1, 3 + 1, 3, 3]
  assert all(a > b for a, b in zip(flops, flops[1:4]))


def test_estimate_saving_weighs_each_phase_by_its_steps(conv_step):
  step, _, args = conv_step
  estimate = mo.estimate_saving(step, *args)
  # Phases start at steps 0, 4, 6, 7; the last, from step 8, is not met.
  assert estimate.steps_per_phase == (4, 2, 1, 1, 0)
  flops = [step.program(*args, phase=p).compile().cost_analysis()["flops"]
           for p in range(4)]
  np.testing.assert_allclose(estimate.phase_flops[:4], flops)
  expected = 1 - (4 * flops[0] + 2 * flops[1] + flops[2] + flops[3]) / (8 * flops[0])
  assert estimate.saving == pytest.approx(expected)
  assert 0.0 < estimate.saving < 1.0


def test_one_program_per_phase_met_and_no_recompilation():
  timetable = mo.FreezeOutTimetable(num_layers=3, total_steps=8, t_0=0.5,
                                  spacing="linear")
  assert timetable.freeze_steps == (4, 6, 8)
  tx = mo.freezeout(optax.sgd(0.1), timetable, layers=MLP_LAYERS)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  data = batches(10)  # made outside the count: making arrays compiles too
  met = []
  with count_compilations() as compiled:
    for batch in data:
      params, opt_state, _ = step(params, opt_state, batch)
      met.append(compiled[0])
  # Phases start at steps 0, 4, 6 and 8 (nothing left to train).
  assert met == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("traced", [False, True])
def test_keep_frozen_keeps_statistics_of_frozen_layers(traced):
  timetable = mo.FreezeOutTimetable(num_layers=3, total_steps=10, t_0=0.5,
                                  spacing="linear")
  assert timetable.freeze_steps == (5, 8, 10)
  layers = {"conv0": 0, "bn0": 0, "conv1": 1, "bn1": 1, "head": 2}
  old = {"bn0": {"mean": jnp.zeros(2)}, "bn1": {"mean": jnp.zeros(3)}}
  new = {"bn0": {"mean": jnp.ones(2)}, "bn1": {"mean": jnp.ones(3)}}
  keep = lambda step: mo.keep_frozen(new, old, timetable, layers=layers, step=step)
  if traced:
    keep = jax.jit(keep)
  for step, bn0, bn1 in [(0, 1, 1), (4, 1, 1), (5, 0, 1), (7, 0, 1), (8, 0, 0)]:
    kept = keep(jnp.int32(step) if traced else step)
    np.testing.assert_array_equal(kept["bn0"]["mean"], np.full(2, bn0))
    np.testing.assert_array_equal(kept["bn1"]["mean"], np.full(3, bn1))
  if not traced:  # Chosen on the host: the very buffers, no device work.
    assert keep(5)["bn0"]["mean"] is old["bn0"]["mean"]
    assert keep(5)["bn1"]["mean"] is new["bn1"]["mean"]


def test_layers_by_module_follows_flax_creation_order():

  class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(12):
        x = nn.Dense(2)(x)
      return x

  params = Deep().init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  layers = mo.layers_by_module(params)
  assert list(layers) == [f"Dense_{i}" for i in range(12)]
  assert list(layers.values()) == list(range(12))


class TestBadInput:

  def test_timetable_arguments(self):
    with pytest.raises(ValueError, match="t_0 must be in"):
      mo.FreezeOutTimetable(num_layers=3, total_steps=10, t_0=0.0)
    with pytest.raises(ValueError, match="spacing must be one of"):
      mo.FreezeOutTimetable(num_layers=3, total_steps=10, spacing="quartic")
    with pytest.raises(TypeError, match="total_steps must be an int"):
      mo.FreezeOutTimetable(num_layers=3, total_steps=10.5)

  def test_a_layer_without_parameters(self):
    timetable = mo.FreezeOutTimetable(num_layers=4, total_steps=10)
    tx = mo.freezeout(optax.sgd(0.1), timetable, layers=MLP_LAYERS)
    with pytest.raises(ValueError, match=r"layers \[3\] have no parameters"):
      tx.init(mlp_params())

  def test_a_layer_index_out_of_range_names_the_leaf(self):
    timetable = mo.FreezeOutTimetable(num_layers=3, total_steps=10)
    tx = mo.freezeout(optax.sgd(0.1), timetable,
                      layers={"layer0": 0, "layer1": 1, "head": 3})
    with pytest.raises(ValueError, match="'head/b' is labelled 3"):
      tx.init(mlp_params())
