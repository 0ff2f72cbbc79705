"""Growing networks: function preservation, variance transfer, stage rates, state."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _probes import count_compilations
from experiments.models.growing import (
    GrowingMLP, GrowingResNet, mlp_layers, resnet_layers)

IMAGES = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
BLOCKS = 2


def resnet_at(widths) -> GrowingResNet:
  return GrowingResNet(stream=widths["stream"],
                       hidden=tuple(widths[f"block{i}"] for i in range(BLOCKS)))


def resnet_apply(widths, params, stats, images, train):
  """Logits and new batch statistics, jitted (the model is static)."""
  return _jitted_apply(resnet_at(widths), params, stats, images, train)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jitted_apply(model, params, stats, images, train):
  return model.apply({"params": params, "batch_stats": stats}, images,
                     train=train, mutable=["batch_stats"])


def trained_resnet(widths):
  """A ResNet with BatchNorm statistics that are not their initial values."""
  variables = jax.jit(functools.partial(resnet_at(widths).init, train=True))(
      jax.random.key(1), IMAGES)
  params, stats = variables["params"], variables["batch_stats"]
  for t in range(3):
    _, updates = resnet_apply(widths, params, stats, IMAGES * (1 + t), True)
    stats = updates["batch_stats"]
  return params, stats


def resnet_logits(widths, params, stats, train=False):
  return resnet_apply(widths, params, stats, IMAGES, train)[0]


PLAN = mo.growth_plan({"stream": 16, "block0": 16, "block1": 12}, 400,
                      first_stage_steps=20, start_fraction=0.5, width_rate=0.3)


@pytest.mark.parametrize("variance_transfer", [False, True])
def test_resnet_computes_the_same_function_after_every_growth(variance_transfer):
  layers = resnet_layers(BLOCKS)
  params, stats = trained_resnet(PLAN.widths[0])
  growth = mo.describe_widths(layers, params)
  key = jax.random.key(2)
  for before, after in zip(PLAN.widths, PLAN.widths[1:]):
    want_eval = resnet_logits(before, params, stats)
    want_train = resnet_logits(before, params, stats, train=True)
    key, grow_key = jax.random.split(key)
    params, stats, growth, _ = mo.grow(
        params, stats, layers, growth, after, key=grow_key,
        variance_transfer=variance_transfer)
    assert growth.widths == {"rgb": 3, "classes": 10, **after}
    np.testing.assert_allclose(resnet_logits(after, params, stats), want_eval,
                               atol=1e-5, rtol=0)
    # Batch statistics: equal up to BatchNorm's epsilon.
    np.testing.assert_allclose(resnet_logits(after, params, stats, train=True),
                               want_train, atol=1e-4, rtol=0)
  assert growth.stage == len(PLAN.widths) - 1


def test_mlp_computes_the_same_function_and_keeps_its_weights():
  layers = mlp_layers(2)
  x = jax.random.normal(jax.random.key(3), (32, 20))
  widths = [{"hidden0": 8, "hidden1": 6}, {"hidden0": 10, "hidden1": 7},
            {"hidden0": 13, "hidden1": 9}]
  model = GrowingMLP(hidden=(8, 6))
  params = model.init(jax.random.key(4), x)["params"]
  growth = mo.describe_widths(layers, params)
  for before, after in zip(widths, widths[1:]):
    want = GrowingMLP(hidden=tuple(before.values())).apply({"params": params}, x)
    old = params
    params, _, growth, factors = mo.grow(params, {}, layers, growth, after,
                                         key=jax.random.key(5))
    got = GrowingMLP(hidden=tuple(after.values())).apply({"params": params}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # No layer of an MLP is normalised: nothing may be rescaled.
    assert set(jax.tree.leaves(factors)) == {1.0}
    for name in old:
      corner = tuple(slice(0, n) for n in old[name]["kernel"].shape)
      np.testing.assert_array_equal(params[name]["kernel"][corner],
                                    old[name]["kernel"])


def test_new_units_are_pairs_that_cancel():
  layers = mlp_layers(1)
  x = jnp.ones((1, 4))
  params = GrowingMLP(hidden=(3,)).init(jax.random.key(0), x)["params"]
  grown, _, _, _ = mo.grow(params, {}, layers, mo.describe_widths(layers, params),
                           {"hidden0": 8}, key=jax.random.key(1))
  fan_in = grown["dense0"]["kernel"]   # (4, 8): units 3..7 are new
  fan_out = grown["head"]["kernel"]    # (8, 10)
  np.testing.assert_array_equal(fan_in[:, 3:5], fan_in[:, 5:7])  # V, V
  np.testing.assert_array_equal(fan_out[3:5], -fan_out[5:7])     # Z, -Z
  np.testing.assert_array_equal(fan_out[7], 0.0)  # the odd unit reads out 0
  np.testing.assert_array_equal(grown["dense0"]["bias"][3:], 0.0)


def test_noise_breaks_the_pairs():
  layers = mlp_layers(1)
  params = GrowingMLP(hidden=(3,)).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  grown, _, _, _ = mo.grow(params, {}, layers, mo.describe_widths(layers, params),
                           {"hidden0": 5}, key=jax.random.key(1), noise=0.01)
  first, second = grown["dense0"]["kernel"][:, 3], grown["dense0"]["kernel"][:, 4]
  assert 0 < float(jnp.max(jnp.abs(first - second))) < 0.1 * float(
      jnp.max(jnp.abs(first)))


def test_variance_transfer_factors_and_batch_norm_statistics():
  layers = resnet_layers(BLOCKS)
  before = {"stream": 8, "block0": 6, "block1": 4}
  after = {"stream": 10, "block0": 9, "block1": 4}
  params, stats = trained_resnet(before)
  grown, grown_stats, _, factors = mo.grow(
      params, stats, layers, mo.describe_widths(layers, params), after,
      key=jax.random.key(3), epsilon=1e-5)
  stream, block0 = math.sqrt(8 / 10), math.sqrt(6 / 9)
  # Normalised layers whose fan-in grew: sqrt(C / C'); the rest 1.
  expected = {"block0_conv1": stream, "block1_conv1": stream,
              "block0_conv2": block0, "block1_conv2": 1.0, "stem": 1.0,
              "head": 1.0}
  for name, factor in expected.items():
    assert factors[name]["kernel"] == pytest.approx(factor)
    corner = tuple(slice(0, n) for n in params[name]["kernel"].shape)
    np.testing.assert_allclose(grown[name]["kernel"][corner],
                               params[name]["kernel"] * factor, rtol=1e-6)
  # The BatchNorm after block0_conv1: mean * c, var -> c**2 (var + eps) - eps,
  # for the units it had before.
  norm, new = stats["block0_norm1"], grown_stats["block0_norm1"]
  np.testing.assert_allclose(new["mean"][:6], norm["mean"] * stream, rtol=1e-6)
  np.testing.assert_allclose(
      new["var"][:6], stream**2 * (norm["var"] + 1e-5) - 1e-5, rtol=1e-5)
  np.testing.assert_array_equal(new["mean"][6:], 0.0)
  np.testing.assert_array_equal(new["var"][6:], 1.0)


@pytest.mark.parametrize("variance_transfer, expected", [(True, 1.0),
                                                          (False, 1.25)])
def test_variance_transfer_keeps_the_activation_scale_of_init(
    variance_transfer, expected):
  # At init-like weights (variance 1 / fan_in), a layer's pre-activation has
  # variance ~1 for unit-variance inputs. After its fan-in grows 4/5 -> 1, with
  # the new inputs decorrelated (as once the pairs have broken symmetry):
  # variance transfer keeps it at 1; without it, it grows to C' / C = 1.25.
  layers = resnet_layers(BLOCKS)
  before = {"stream": 64, "block0": 64, "block1": 64}
  after = {"stream": 80, "block0": 64, "block1": 64}
  variables = jax.jit(resnet_at(before).init)(jax.random.key(0), IMAGES)
  params, stats = variables["params"], variables["batch_stats"]
  grown, _, _, _ = mo.grow(params, stats, layers,
                           mo.describe_widths(layers, params), after,
                           key=jax.random.key(1),
                           variance_transfer=variance_transfer)
  kernel = np.asarray(grown["block0_conv1"]["kernel"]).copy()
  new_rows = kernel[:, :, 64:]
  # Decorrelate the pairs' read-out weights (Z, -Z -> two independent draws).
  kernel[:, :, 72:] = np.random.default_rng(0).normal(
      size=new_rows[:, :, 8:].shape) * np.std(new_rows[:, :, :8])
  inputs = np.random.default_rng(1).normal(size=(4000,) + kernel.shape[:3])
  outputs = np.einsum("nhwi,hwio->no", inputs, kernel)
  assert np.var(outputs) == pytest.approx(expected, rel=0.05)


def test_element_stages():
  layers = mlp_layers(1)
  params = GrowingMLP(hidden=(2,)).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  growth = mo.describe_widths(layers, params)
  params, _, growth, _ = mo.grow(params, {}, layers, growth, {"hidden0": 4},
                                 key=jax.random.key(1))
  params, _, growth, _ = mo.grow(params, {}, layers, growth, {"hidden0": 5},
                                 key=jax.random.key(2))
  stages = mo.element_stages(params, layers, growth)
  np.testing.assert_array_equal(growth.unit_stages["hidden0"], [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(stages["dense0"]["kernel"],
                                np.tile([0, 0, 1, 1, 2], (3, 1)))
  np.testing.assert_array_equal(stages["dense0"]["bias"], [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(stages["head"]["kernel"],
                                np.tile([[0], [0], [1], [1], [2]], (1, 10)))
  np.testing.assert_array_equal(stages["head"]["bias"], np.zeros(10))


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_stage_rates_follow_the_formula(scope):
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
  stages = {"a": rng.integers(0, 3, size=(4, 6)), "b": np.array([0, 0, 0, 1, 2])}
  tx = mo.scale_by_stage_norms(stages, scope)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params),
                                  tx.init(params), params)

  def norm(names, stage):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(params[n])[
        stages[n] == stage]))) for n in names))

  for name in params:
    names = [name] if scope == "layer" else list(params)
    for stage in range(3):
      want = 1.0 if stage == 0 else norm(names, stage) / norm(names, 0)
      np.testing.assert_allclose(np.asarray(updates[name])[stages[name] == stage],
                                 want, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: optax.sgd(0.1, momentum=0.9),
                                  lambda: optax.adam(1e-2)],
                         ids=["sgd_momentum", "adam"])
def test_optimizer_state_follows_the_growth(make):
  layers = resnet_layers(BLOCKS)
  before = {"stream": 4, "block0": 4, "block1": 2}
  params, stats = trained_resnet(before)
  tx = make()
  state = tx.init(params)
  for t in range(3):  # non-zero moments and counts
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (t + 1)), params)
    _, state = tx.update(grads, state, params)
  grown, _, _, factors = mo.grow(params, stats, layers,
                                 mo.describe_widths(layers, params),
                                 {"stream": 6, "block0": 5, "block1": 2},
                                 key=jax.random.key(0))
  new_state = mo.grow_optimizer_state(tx, state, grown, factors)
  old_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for (path, old), new in zip(old_leaves, jax.tree.leaves(new_state)):
    text = jax.tree_util.keystr(path)
    if np.ndim(old) == 0:  # counts
      assert int(new) == int(old) == 3, text
      continue
    layer = next(name for name in params if f"'{name}'" in text)
    leaf = "kernel" if "'kernel'" in text else ("scale" if "'scale'" in text
                                                else "bias")
    power = 2 if ".nu" in text else 1
    factor = factors[layer][leaf] ** -power
    corner = tuple(slice(0, n) for n in np.shape(old))
    np.testing.assert_allclose(np.asarray(new)[corner], np.asarray(old) * factor,
                               rtol=1e-6, err_msg=text)
    rest = np.asarray(new).copy()
    rest[corner] = 0.0
    np.testing.assert_array_equal(rest, 0.0, err_msg=text)


def test_optimizer_state_reset_keeps_only_the_counts():
  layers = mlp_layers(1)
  params = GrowingMLP(hidden=(3,)).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  tx = optax.adam(1e-2)
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  grown, _, _, factors = mo.grow(params, {}, layers,
                                 mo.describe_widths(layers, params),
                                 {"hidden0": 6}, key=jax.random.key(1))
  reset = mo.grow_optimizer_state(tx, state, grown, factors, reset=True)
  fresh = tx.init(grown)
  assert int(reset[0].count) == 2
  unchanged = jax.tree.map(lambda a, b: np.array_equal(a, b),
                           (reset[0].mu, reset[0].nu), (fresh[0].mu, fresh[0].nu))
  assert all(jax.tree.leaves(unchanged))


def test_multirate_across_a_growth_with_one_compile_per_stage_and_phase():
  layers = mlp_layers(1)
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jnp.arange(16) % 10
  widths = [{"hidden0": 8}, {"hidden0": 10}, {"hidden0": 12}]
  params = GrowingMLP(hidden=(8,)).init(jax.random.key(1), x)["params"]
  growth = mo.describe_widths(layers, params)
  tx = mo.multirate(optax.sgd(0.05, momentum=0.9),
                    labels=mo.fast_by_path("^head/"), period=2)
  opt_state = tx.init(params)
  compiles = []
  for stage, width in enumerate(widths):
    if stage:
      params, _, growth, factors = mo.grow(params, {}, layers, growth, width,
                                           key=jax.random.key(stage))
      opt_state = mo.grow_optimizer_state(tx, opt_state, params, factors)
    model = GrowingMLP(hidden=(width["hidden0"],))

    def loss_fn(params, model=model):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    step = mo.train_step(loss_fn, tx, dispatch="host")
    with count_compilations() as compiled:
      for _ in range(6):
        params, opt_state, loss = step(params, opt_state)
    compiles.append(compiled[0])
    assert np.isfinite(float(loss))
  assert int(mo.find_timetable_state(opt_state).count) == 18
  # One program per phase (slow, fast) per stage, and no other compilation.
  assert compiles == [2, 2, 2]


class TestBadDescriptions:

  def setup_method(self):
    self.params, self.stats = trained_resnet({"stream": 4, "block0": 4,
                                              "block1": 4})
    self.layers = resnet_layers(BLOCKS)
    self.growth = mo.describe_widths(self.layers, self.params)

  def test_path_not_in_params(self):
    layers = self.layers + (mo.Layer(kernel="block9/kernel", reads="stream",
                                     writes="x"),)
    with pytest.raises(ValueError, match="names 'block9/kernel', which is not "
                       "in the params"):
      mo.describe_widths(layers, self.params)

  def test_layers_that_disagree_on_a_width(self):
    layers = list(self.layers)
    layers[1] = mo.Layer(kernel="block0_conv1/kernel", reads="classes",
                         writes="block0", norm="block0_norm1")
    with pytest.raises(ValueError, match="width 'classes' has size 4 at "
                       "'block0_conv1/kernel' \\(axis -2\\) but 10 at "
                       "'head/kernel'"):
      mo.describe_widths(layers, self.params)

  def test_unknown_width(self):
    with pytest.raises(ValueError, match="width 'blokc0' is not in the "
                       "description"):
      mo.grow(self.params, self.stats, self.layers, self.growth, {"blokc0": 5},
              key=jax.random.key(0))

  def test_shrinking(self):
    with pytest.raises(ValueError, match="cannot shrink from 4 to 3"):
      mo.grow(self.params, self.stats, self.layers, self.growth, {"stream": 3},
              key=jax.random.key(0))

  def test_stale_growth_record(self):
    grown, stats, _, _ = mo.grow(self.params, self.stats, self.layers,
                                 self.growth, {"stream": 6},
                                 key=jax.random.key(0))
    with pytest.raises(ValueError, match="the growth record has widths"):
      mo.grow(grown, stats, self.layers, self.growth, {"stream": 8},
              key=jax.random.key(0))


def test_growth_plan_follows_the_formulas():
  plan = mo.growth_plan({"a": 40, "b": 8}, 1000, first_stage_steps=10,
                        length_rate=0.5)
  a = [10]
  while a[-1] < 40:
    a.append(min(40, a[-1] + max(1, round(0.2 * a[-1]))))
  assert [w["a"] for w in plan.widths] == a
  assert all(w["b"] <= 8 for w in plan.widths) and plan.widths[-1]["b"] == 8
  lengths = [10]
  for _ in range(len(a) - 2):
    lengths.append(lengths[-1] + round(0.5 * lengths[-1]))
  assert plan.lengths == tuple(lengths) + (1000 - sum(lengths),)
  assert plan.stage_at(0) == 0 and plan.stage_at(10) == 1
  assert plan.stage_at(999) == len(a) - 1
  fixed = mo.growth_plan({"a": 40}, 500, first_stage_steps=30, length_rate=0)
  assert set(fixed.lengths[:-1]) == {30}
  eights = mo.growth_plan({"a": 36}, 500, first_stage_steps=10,
                          multiple_of=8, width_rate=0.5)
  assert [w["a"] for w in eights.widths] == [16, 24, 36]


def test_growth_plan_errors():
  with pytest.raises(ValueError, match="need .* steps before the last stage"):
    mo.growth_plan({"a": 64}, 100, first_stage_steps=50)
  with pytest.raises(ValueError, match="start_fraction must be"):
    mo.growth_plan({"a": 64}, 100, first_stage_steps=5, start_fraction=1.5)
  with pytest.raises(TypeError, match="first_stage_steps must be an int"):
    mo.growth_plan({"a": 64}, 100, first_stage_steps=5.0)
