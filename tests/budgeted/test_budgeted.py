"""Budgeted transfer (SWR/TAPS): reparametrized layers, gates, the budget."""

import math
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _probes import hlo_op_count
from multirate_optax import budgeted


class ConvNet(nn.Module):
  """A conv layer, a hidden dense layer and a head, with biases."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def convnet():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  params = model.init(jax.random.key(1), x)
  return model, params, x


LAYERS = ("params/Conv_0/kernel", "params/Dense_0/kernel",
          "params/Dense_1/kernel")


def random_deltas(params, layers, seed=2):
  rng = np.random.default_rng(seed)
  return {layer: jnp.asarray(rng.normal(size=w.shape), w.dtype)
          for layer, w in budgeted.init_deltas(params, layers).items()}


def weight(params, layer):
  node = params
  for key in layer.split("/"):
    node = node[key]
  return node


class TestReparametrized:

  def test_candidates_are_the_kernels_in_tree_order(self, convnet):
    _, params, _ = convnet
    assert budgeted.candidate_layers(params) == LAYERS
    assert budgeted.candidate_layers(params, include="Dense") == LAYERS[1:]
    assert budgeted.candidate_layers(
        params, include=["Conv", "Dense_1"], exclude="Conv") == LAYERS[2:]

  def test_an_include_pattern_that_matches_nothing_is_an_error(self, convnet):
    _, params, _ = convnet
    with pytest.raises(ValueError, match="'Dense_7'.*params/Conv_0/kernel"):
      budgeted.candidate_layers(params, include="Dense_7")

  def test_sizes_and_zero_deltas(self, convnet):
    _, params, _ = convnet
    assert budgeted.layer_sizes(params, LAYERS) == {
        LAYERS[0]: 3 * 3 * 2 * 4, LAYERS[1]: 4 * 5, LAYERS[2]: 5 * 3}
    deltas = budgeted.init_deltas(params, LAYERS)
    assert list(deltas) == list(LAYERS)
    for layer, delta in deltas.items():
      assert delta.shape == weight(params, layer).shape
      assert delta.dtype == weight(params, layer).dtype
      assert not np.any(np.asarray(delta))

  def test_apply_deltas_is_w0_plus_gate_times_delta(self, convnet):
    _, params, _ = convnet
    deltas = random_deltas(params, LAYERS[:2])
    gates = {LAYERS[0]: jnp.asarray(0.25), LAYERS[1]: 2.0}
    changed = budgeted.apply_deltas(params, deltas, gates)
    for layer, gate in ((LAYERS[0], 0.25), (LAYERS[1], 2.0)):
      np.testing.assert_allclose(
          weight(changed, layer),
          np.asarray(weight(params, layer)) + gate * np.asarray(deltas[layer]),
          rtol=1e-6)
    adapted = {id(weight(params, layer)) for layer in LAYERS[:2]}
    for new, old in zip(jax.tree.leaves(changed), jax.tree.leaves(params)):
      if id(old) not in adapted:
        assert new is old

  def test_merged_and_gated_models_give_the_same_outputs(self, convnet):
    model, params, x = convnet
    deltas = random_deltas(params, LAYERS)
    scores = {LAYERS[0]: jnp.asarray(0.3), LAYERS[1]: jnp.asarray(0.02),
              LAYERS[2]: jnp.asarray(0.1)}
    gates = budgeted.threshold_gates(scores)
    selection = (LAYERS[0], LAYERS[2])  # Scores at or above 0.1.
    gated = jax.jit(model.apply)(
        budgeted.apply_deltas(params, deltas, gates), x)
    merged_params = budgeted.merge(params, deltas, selection)
    merged = jax.jit(model.apply)(merged_params, x)
    np.testing.assert_array_equal(merged, gated)
    # The original architecture: same tree, shapes and dtypes.
    assert jax.tree.structure(merged_params) == jax.tree.structure(params)
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), merged_params)
            == jax.tree.map(lambda a: (a.shape, a.dtype), params))
    # Independent reference: W0 + dW on the selection, W0 elsewhere.
    for layer in LAYERS:
      expected = np.asarray(weight(params, layer)) + (
          np.asarray(deltas[layer]) if layer in selection else 0.0)
      np.testing.assert_array_equal(weight(merged_params, layer), expected)
    assert not np.array_equal(merged, model.apply(params, x))

  def test_merge_keeps_each_weights_dtype(self):
    params = {"w": jnp.ones((2, 2), jnp.bfloat16)}
    merged = budgeted.merge(params, {"w": jnp.full((2, 2), 0.5)}, ["w"])
    assert merged["w"].dtype == jnp.bfloat16
    assert merged["w"].tolist() == [[1.5, 1.5], [1.5, 1.5]]

  @pytest.mark.parametrize("call", [
      lambda p: budgeted.layer_sizes(p, ["params/Dense_9/kernel"]),
      lambda p: budgeted.init_deltas(p, ["params/Dense_9/kernel"]),
      lambda p: budgeted.apply_deltas(
          p, {"params/Dense_9/kernel": jnp.ones((4, 5))},
          {"params/Dense_9/kernel": 1.0}),
  ])
  def test_a_layer_not_in_the_params_is_named_with_the_paths(self, convnet,
                                                            call):
    _, params, _ = convnet
    with pytest.raises(ValueError, match=r"'params/Dense_9/kernel' is not in "
                       r"the parameters.*Available paths: .*"
                       r"'params/Dense_0/kernel'"):
      call(params)

  def test_merge_of_a_layer_without_a_change_is_an_error(self, convnet):
    _, params, _ = convnet
    deltas = budgeted.init_deltas(params, LAYERS[:1])
    with pytest.raises(ValueError, match=r"'params/Dense_1/kernel' is not in "
                       r"the changes.*'params/Conv_0/kernel'"):
      budgeted.merge(params, deltas, [LAYERS[2]])

  def test_gates_must_cover_the_deltas(self, convnet):
    _, params, _ = convnet
    deltas = budgeted.init_deltas(params, LAYERS[:2])
    with pytest.raises(ValueError, match=r"without a gate: \['params/Dense_0"):
      budgeted.apply_deltas(params, deltas, {LAYERS[0]: 1.0})
    with pytest.raises(ValueError, match="must be a scalar"):
      budgeted.apply_deltas(params, deltas,
                            {LAYERS[0]: 1.0, LAYERS[1]: jnp.ones(2)})

  def test_a_delta_of_the_wrong_shape_is_an_error(self, convnet):
    _, params, _ = convnet
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel' has shape "
                       r"\(5, 4\), but its weight has shape \(4, 5\)"):
      budgeted.apply_deltas(params, {LAYERS[1]: jnp.ones((5, 4))},
                            {LAYERS[1]: 1.0})


class TestThresholdGates:

  def test_hard_gates_forward(self):
    scores = {"a": jnp.asarray(0.1), "b": jnp.asarray(0.0999),
              "c": jnp.asarray(-2.0), "d": jnp.asarray(5.0)}
    gates = jax.jit(budgeted.threshold_gates)(scores)
    assert {k: float(v) for k, v in gates.items()} == {
        "a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0}

  def test_straight_through_gradient_of_a_quadratic_loss(self):
    """d loss / d s_l = <d loss / d W_l, dW_l>, by hand for least squares."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    w0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(4, 2))}
    deltas = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(4, 2))}
    scores = {"a": 0.15, "b": 0.05}  # Gate a on, gate b off.
    penalty = 0.7

    def loss(scores):
      params = budgeted.apply_deltas(
          jax.tree.map(jnp.asarray, w0), jax.tree.map(jnp.asarray, deltas),
          budgeted.threshold_gates(scores))
      residual = x @ params["a"] @ params["b"] - y
      return (0.5 * jnp.sum(residual ** 2)
              + penalty * budgeted.sparsity_penalty(scores))

    grads = jax.jit(jax.grad(loss))(jax.tree.map(jnp.asarray, scores))
    # By hand, float64: W_a = w0_a + dW_a (gate on), W_b = w0_b (gate off).
    w_a, w_b = w0["a"] + deltas["a"], w0["b"]
    residual = x @ w_a @ w_b - y
    d_w_a = x.T @ residual @ w_b.T
    d_w_b = (x @ w_a).T @ residual
    expected = {"a": np.sum(d_w_a * deltas["a"]) + penalty / 2,
                "b": np.sum(d_w_b * deltas["b"]) + penalty / 2}
    for layer in ("a", "b"):
      np.testing.assert_allclose(grads[layer], expected[layer], rtol=1e-4)
      assert abs(expected[layer]) > 1.0

  def test_sparsity_penalty_and_its_warmup(self):
    scores = {"a": jnp.asarray(0.3), "b": jnp.asarray(-0.5),
              "c": jnp.asarray(0.1)}
    assert float(budgeted.sparsity_penalty(scores)) == pytest.approx(0.3)
    weights = jax.jit(budgeted.penalty_weight, static_argnums=(1, 2))
    assert [float(weights(jnp.asarray(t), 2.0, 3)) for t in range(5)] == [
        0.0, 0.0, 0.0, 2.0, 2.0]

  def test_init_scores(self):
    scores = budgeted.init_scores(LAYERS)
    assert list(scores) == list(LAYERS)
    assert all(float(s) == np.float32(0.15) and s.shape == ()
               for s in scores.values())


def greedy_reference(scores, sizes, budget, threshold):
  """The greedy choice, written out: best score first, skip what won't fit."""
  names = list(sizes)
  ranked = sorted(range(len(names)), key=lambda i: (-scores[names[i]], i))
  left, chosen = budget, []
  for i in ranked:
    name = names[i]
    if scores[name] >= threshold and sizes[name] <= left:
      chosen.append(name)
      left -= sizes[name]
  return tuple(n for n in names if n in chosen)


class TestSelectWithinBudget:

  def test_never_exceeds_the_budget_over_a_sweep(self):
    rng = np.random.default_rng(0)
    for trial in range(300):
      num = int(rng.integers(1, 30))
      names = [f"layer_{i}/kernel" for i in range(num)]
      sizes = {n: int(s) for n, s in
               zip(names, rng.integers(1, 10 ** rng.integers(1, 6), num))}
      # Ties are frequent: scores from a few values.
      raw = rng.choice([-0.2, 0.0, 0.05, 0.1, 0.4, 0.9], num) if trial % 2 else (
          rng.normal(size=num))
      kind = trial % 3
      scores = {n: (jnp.asarray(s, jnp.float32) if kind == 0 else
                    np.float32(s) if kind == 1 else float(s))
                for n, s in zip(names, raw)}
      threshold = float(rng.choice([0.0, 0.1, -1.0]))
      total = sum(sizes.values())
      for budget in {1, min(sizes.values()), total // 20 + 1, total // 2 + 1,
                     total - 1 or 1, total, 10 * total}:
        selection = budgeted.select_within_budget(
            scores, sizes, budget, threshold=threshold)
        assert sum(sizes[n] for n in selection) <= budget
        assert len(set(selection)) == len(selection)
        assert all(float(scores[n]) >= threshold for n in selection)
        assert selection == greedy_reference(
            {n: float(np.float32(s)) for n, s in scores.items()}, sizes,
            budget, threshold)

  def test_budget_below_every_layer_selects_nothing(self):
    sizes = {"a": 10, "b": 20, "c": 15}
    scores = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert budgeted.select_within_budget(scores, sizes, 9) == ()

  def test_budget_above_the_total_selects_every_preferred_layer(self):
    sizes = {"a": 10, "b": 20, "c": 15, "d": 5}
    scores = {"a": 0.5, "b": -0.1, "c": 0.1, "d": 0.09}
    assert budgeted.select_within_budget(scores, sizes, 50) == ("a", "c", "d")
    assert budgeted.select_within_budget(
        scores, sizes, 10 ** 9, threshold=0.1) == ("a", "c")
    # The TAPS threshold keeps exactly the layers whose gate is on.
    gates = budgeted.threshold_gates(
        {k: jnp.asarray(v) for k, v in scores.items()})
    assert tuple(k for k, g in gates.items() if g == 1) == ("a", "c")

  def test_skips_a_layer_that_no_longer_fits_and_takes_a_smaller_one(self):
    sizes = {"a": 60, "b": 50, "c": 30, "d": 10}
    scores = {"a": 0.9, "b": 0.8, "c": 0.3, "d": 0.2}
    assert budgeted.select_within_budget(scores, sizes, 100) == ("a", "c", "d")
    # Ties go in the order of sizes.
    tied = dict.fromkeys(sizes, 0.5)
    assert budgeted.select_within_budget(tied, sizes, 70) == ("a", "d")

  @pytest.mark.parametrize("budget, error, message", [
      (0, ValueError, "> 0, got 0"),
      (-5, ValueError, "> 0, got -5"),
      (2.5, TypeError, "whole number of parameters, got 2.5"),
      (float("nan"), ValueError, "NaN"),
      (True, TypeError, "got True of type bool"),
      ("100", TypeError, "got '100' of type str"),
  ])
  def test_bad_budgets(self, budget, error, message):
    with pytest.raises(error, match=message):
      budgeted.select_within_budget({"a": 1.0}, {"a": 3}, budget)

  def test_whole_budgets_of_other_types_are_accepted(self):
    for budget in (np.int64(3), 3.0, jnp.asarray(3)):
      assert budgeted.select_within_budget({"a": 1.0}, {"a": 3}, budget) == (
          "a",)

  def test_a_traced_budget_is_refused_with_a_hint(self):
    probs = {"a": jnp.asarray(0.5)}
    with pytest.raises(TypeError, match=r"budget must be known when the "
                       r"function is traced.*static_argnums"):
      jax.jit(lambda budget: budgeted.budget_penalty(probs, {"a": 3}, budget))(3)

  def test_scores_and_sizes_naming_other_layers(self):
    with pytest.raises(ValueError, match=r"size but no score: \['b'\].*"
                       r"score but no size: \['c'\]"):
      budgeted.select_within_budget({"a": 1.0, "c": 1.0}, {"a": 3, "b": 4}, 10)
    with pytest.raises(ValueError, match="score of layer 'a' is NaN"):
      budgeted.select_within_budget({"a": math.nan}, {"a": 3}, 10)
    with pytest.raises(ValueError, match="size of layer 'a'"):
      budgeted.select_within_budget({"a": 1.0}, {"a": 0}, 10)


class TestPolicy:

  SIZES = {"a": 100, "b": 40, "c": 10}

  def probs(self):
    return {"a": jnp.asarray(0.2), "b": jnp.asarray(0.5), "c": jnp.asarray(1.0)}

  def test_expected_cost_is_the_sum_of_probability_times_size(self):
    cost = budgeted.expected_cost(self.probs(), self.SIZES)
    assert float(cost) == pytest.approx(0.2 * 100 + 0.5 * 40 + 1.0 * 10)

  def test_budget_penalty_is_zero_within_the_budget(self):
    probs = self.probs()  # Expected cost 50.
    for budget in (50, 51, 1000):
      assert float(budgeted.budget_penalty(probs, self.SIZES, budget)) == 0.0
    assert float(budgeted.budget_penalty(probs, self.SIZES, 40)) == (
        pytest.approx(50 / 40 - 1))
    grads = jax.grad(budgeted.budget_penalty)(probs, self.SIZES, 40)
    assert {k: float(v) for k, v in grads.items()} == pytest.approx(
        {k: n / 40 for k, n in self.SIZES.items()})
    with pytest.raises(ValueError, match="> 0"):
      budgeted.budget_penalty(probs, self.SIZES, 0)

  def test_layer_features_by_hand(self, convnet):
    _, params, _ = convnet
    deltas = random_deltas(params, LAYERS)
    deltas[LAYERS[1]] = deltas[LAYERS[1]] * 0.0
    features = np.asarray(budgeted.layer_features(params, deltas, LAYERS))
    sizes = np.array([72, 20, 15], float)
    change = np.array([np.linalg.norm(deltas[l]) / np.linalg.norm(
        weight(params, l)) for l in LAYERS])
    expected = np.stack([np.log1p(sizes) / np.log1p(72), sizes / sizes.sum(),
                         [0.0, 0.5, 1.0], change / change.max()], axis=1)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-7)
    assert features.shape == (3, len(budgeted.FEATURE_NAMES))

  def test_sampled_gates_are_0_or_1_with_the_policy_probabilities(self):
    probs = {"a": jnp.asarray(0.1), "b": jnp.asarray(0.5),
             "c": jnp.asarray(0.9)}
    draws = jax.jit(jax.vmap(budgeted.sample_gates, in_axes=(0, None)))(
        jax.random.split(jax.random.key(0), 4000), probs)
    for layer, p in probs.items():
      values = np.asarray(draws[layer])
      assert set(np.unique(values)) <= {0.0, 1.0}
      assert abs(values.mean() - float(p)) < 0.03

  def test_gradient_reaches_the_policy_through_the_sampled_gates(self):
    layers = ("a", "b", "c")
    policy = budgeted.Policy(layers, hidden=8)
    policy_params = policy.init(jax.random.key(0), num_features=2)
    features = jnp.asarray([[0.1, 0.9], [0.5, 0.2], [1.0, 0.0]])
    weights = {"a": 2.0, "b": -1.0, "c": 0.5}

    def loss(policy_params, key):
      probs = policy.apply(policy_params, features, 0.25)
      gates = budgeted.sample_gates(key, probs)
      return sum(weights[l] * gates[l] for l in layers)

    grads = jax.jit(jax.grad(loss))(policy_params, jax.random.key(3))
    # Straight through: as if the gates were the probabilities.
    def mean_loss(policy_params):
      probs = policy.apply(policy_params, features, 0.25)
      return sum(weights[l] * probs[l] for l in layers)
    expected = jax.jit(jax.grad(mean_loss))(policy_params)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6),
                 grads, expected)
    # By hand for the per-layer bias: w_l * sigmoid'(logit_l).
    probs = np.asarray(jax.nn.sigmoid(policy.logits(policy_params, features,
                                                    0.25)))
    np.testing.assert_allclose(
        grads["layer_bias"],
        [weights[l] * p * (1 - p) for l, p in zip(layers, probs)], rtol=1e-5)
    assert np.all(np.abs(np.asarray(grads["hidden"]["kernel"])) > 0)

  def test_policy_trained_on_the_penalty_gets_within_the_budget(self):
    """A task that wants every layer, and a budget for about one of them."""
    sizes = {"a": 100, "b": 40, "c": 10}
    policy = budgeted.Policy(tuple(sizes), hidden=4)
    policy_params = policy.init(jax.random.key(0), 1, initial_probability=0.9)
    features = jnp.asarray([[1.0], [0.4], [0.1]])

    def loss(policy_params, key):
      probs = policy.apply(policy_params, features, 50 / 150)
      gates = budgeted.sample_gates(key, probs)
      task = -0.01 * sum(gates.values())
      return task + budgeted.budget_penalty(probs, sizes, 50)

    @jax.jit
    def step(policy_params, key):
      grads = jax.grad(loss)(policy_params, key)
      return jax.tree.map(lambda p, g: p - 0.5 * g, policy_params, grads)

    def steps(policy_params, keys):
      return jax.lax.scan(lambda p, k: (step(p, k), None), policy_params,
                          keys)[0]
    policy_params = jax.jit(steps)(policy_params,
                                   jax.random.split(jax.random.key(1), 300))
    probs = policy.apply(policy_params, features, 50 / 150)
    assert float(budgeted.expected_cost(probs, sizes)) <= 55
    selection = budgeted.select_within_budget(probs, sizes, 50)
    assert sum(sizes[l] for l in selection) <= 50

  def test_policy_errors(self):
    policy = budgeted.Policy(("a", "b"))
    policy_params = policy.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"shape \[2, num_features\].*\(3, 3\)"):
      policy.apply(policy_params, jnp.zeros((3, 3)), 0.1)
    with pytest.raises(ValueError, match="initial_probability"):
      policy.init(jax.random.key(0), 3, initial_probability=1.0)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (8, 8, 8):
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(3)(x)


def softmax_loss(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None],
                                       axis=1))


class TestTransfer:

  def test_unselected_changes_stay_zero_and_selected_ones_follow_sgd(
      self, convnet):
    model, params, x = convnet
    y = jnp.asarray([0, 2])
    selection = (LAYERS[0], LAYERS[2])
    everything_on = dict.fromkeys(LAYERS, 1.0)  # Gradients reach every dW.

    def loss_fn(trainable, x, y):
      weights = budgeted.apply_deltas(params, trainable["deltas"],
                                      everything_on)
      logits = model.apply(weights, x) + trainable["head"]["bias"]
      return softmax_loss(logits, y)

    optimizer = optax.chain(optax.add_decayed_weights(0.01),
                            optax.sgd(0.1, momentum=0.9))
    deltas = budgeted.init_deltas(params, LAYERS)
    tx = budgeted.transfer(selection, optimizer, deltas, also_train="^head/")
    step = mo.train_step(loss_fn, tx)
    trainable = {"deltas": deltas, "head": {"bias": jnp.zeros(3)}}
    opt_state = tx.init(trainable)
    # Reference: SGD with momentum and decay on the trained leaves alone
    # (its own arrays: the step donates the ones it is given).
    zeros = budgeted.init_deltas(params, LAYERS)
    trained = {"deltas": {l: zeros[l] for l in selection},
               "head": {"bias": jnp.zeros(3)}}
    frozen = {l: zeros[l] for l in LAYERS if l not in selection}
    velocity = jax.tree.map(jnp.zeros_like, trained)
    reference_grad = jax.jit(jax.grad(
        lambda t: loss_fn({"deltas": {**t["deltas"], **frozen},
                           "head": t["head"]}, x, y)))
    for _ in range(4):
      trainable, opt_state, _ = step(trainable, opt_state, x, y)
      grads = reference_grad(trained)
      velocity = jax.tree.map(lambda v, g, p: 0.9 * v + g + 0.01 * p,
                              velocity, grads, trained)
      trained = jax.tree.map(lambda p, v: p - 0.1 * v, trained, velocity)
    for layer in LAYERS:
      if layer in selection:
        np.testing.assert_allclose(trainable["deltas"][layer],
                                   trained["deltas"][layer], rtol=1e-5,
                                   atol=1e-7)
        assert np.any(np.asarray(trainable["deltas"][layer]) != 0)
      else:
        assert not np.any(np.asarray(trainable["deltas"][layer]))
    np.testing.assert_allclose(trainable["head"]["bias"],
                               trained["head"]["bias"], rtol=1e-5)

  def test_no_backward_work_for_unselected_layers(self):
    model = MLP()
    x, y = jnp.ones((4, 5)), jnp.asarray([0, 1, 2, 0])
    params = model.init(jax.random.key(0), x)
    layers = budgeted.candidate_layers(params)
    assert len(layers) == 4
    deltas = budgeted.init_deltas(params, layers)
    everything_on = dict.fromkeys(layers, 1.0)

    def loss_fn(trainable, x, y):
      weights = budgeted.apply_deltas(params, trainable["deltas"],
                                      everything_on)
      return softmax_loss(model.apply(weights, x), y)

    def dots(selection):
      tx = budgeted.transfer(selection, optax.sgd(0.1), deltas)
      step = mo.train_step(loss_fn, tx, dispatch="host")
      trainable = {"deltas": deltas}
      return hlo_op_count(step.program(trainable, tx.init(trainable), x, y,
                                       phase=0), "dot")

    # Forward 4 dots; all layers: 4 weight gradients + 3 input gradients;
    # the last two: 2 weight gradients + 1 input gradient.
    assert dots(layers) == 11
    assert dots(layers[2:]) == 7
    assert dots(layers[3:]) == 5

  def test_conv_weight_gradient_only_when_selected(self, convnet):
    model, params, x = convnet
    deltas = budgeted.init_deltas(params, LAYERS)
    everything_on = dict.fromkeys(LAYERS, 1.0)

    def loss_fn(trainable, x):
      weights = budgeted.apply_deltas(params, trainable["deltas"],
                                      everything_on)
      return jnp.sum(model.apply(weights, x) ** 2)

    def convolutions(selection):
      tx = budgeted.transfer(selection, optax.sgd(0.1), deltas)
      step = mo.train_step(loss_fn, tx, dispatch="host")
      trainable = {"deltas": deltas}
      return hlo_op_count(
          step.program(trainable, tx.init(trainable), x, phase=0),
          "convolution")

    assert convolutions(LAYERS) == 2  # Forward and weight gradient.
    assert convolutions(LAYERS[1:]) == 1  # Forward only.

  def test_errors(self, convnet):
    _, params, _ = convnet
    deltas = budgeted.init_deltas(params, LAYERS[:2])
    with pytest.raises(ValueError, match=r"'params/Dense_1/kernel' is not in "
                       r"the changes.*'params/Conv_0/kernel'"):
      budgeted.transfer([LAYERS[2]], optax.sgd(0.1), deltas)
    tx = budgeted.transfer([LAYERS[0]], optax.sgd(0.1), deltas)
    with pytest.raises(ValueError, match=r"keys \['changes'\].*'deltas'"):
      tx.init({"changes": deltas})
    with pytest.raises(ValueError, match=r"'params/Conv_0/kernel' is not in "
                       r"the trainable tree's 'deltas'"):
      tx.init({"deltas": {LAYERS[1]: deltas[LAYERS[1]]}})
    with pytest.raises(ValueError, match="would train nothing"):
      budgeted.transfer([], optax.sgd(0.1), deltas).init({"deltas": deltas})


class TestArtefact:

  def trained(self, convnet):
    """A few transfer steps on two layers, and a new head bias."""
    model, params, x = convnet
    y = jnp.asarray([1, 2])
    selection = (LAYERS[0], LAYERS[2])
    deltas = budgeted.init_deltas(params, LAYERS)
    gates = {l: float(l in selection) for l in LAYERS}

    def loss_fn(trainable, x, y):
      return softmax_loss(model.apply(
          budgeted.apply_deltas(params, trainable["deltas"], gates), x), y)

    tx = budgeted.transfer(selection, optax.adam(0.05), deltas)
    step = mo.train_step(loss_fn, tx)
    trainable = {"deltas": deltas}
    opt_state = tx.init(trainable)
    for _ in range(3):
      trainable, opt_state, _ = step(trainable, opt_state, x, y)
    return trainable["deltas"], selection

  def test_a_reloaded_artefact_reproduces_the_outputs(self, convnet, tmp_path):
    from multirate_optax import checkpoint
    model, params, x = convnet
    deltas, selection = self.trained(convnet)
    head_bias = jnp.asarray([0.5, -1.0, 2.0])
    task = budgeted.merge(params, deltas, selection)
    task["params"]["Dense_1"]["bias"] = head_bias
    expected = model.apply(task, x)
    checkpoint.save_transfer(tmp_path / "task", deltas, selection,
                             replaced={"params/Dense_1/bias": head_bias})
    loaded = checkpoint.load_transfer(tmp_path / "task", params)
    np.testing.assert_array_equal(model.apply(loaded, x), expected)
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), loaded)
            == jax.tree.map(lambda a: (a.shape, a.dtype), params))
    assert not np.array_equal(expected, model.apply(params, x))
    # Only the selected changes (and the replaced leaf) are stored.
    stored = jax.tree.leaves(checkpoint._orbax.ocp.StandardCheckpointer().restore(
        tmp_path / "task" / checkpoint._orbax.ARRAYS_ITEM))
    assert sorted(a.size for a in stored) == sorted(
        [3, 72, 15])

  def test_loading_onto_another_backbone_is_refused(self, convnet, tmp_path):
    from multirate_optax import checkpoint
    _, params, _ = convnet
    deltas, selection = self.trained(convnet)
    checkpoint.save_transfer(tmp_path / "task", deltas, selection)
    other = jax.tree.map(lambda a: a, params)
    other["params"]["Dense_1"]["kernel"] = jnp.zeros((6, 3))
    with pytest.raises(ValueError, match=r"layer 'params/Dense_1/kernel' with "
                       r"shape \(5, 3\), but the base parameters have shape "
                       r"\(6, 3\)"):
      checkpoint.load_transfer(tmp_path / "task", other)
    del other["params"]["Dense_1"]
    with pytest.raises(ValueError, match=r"'params/Dense_1/kernel' is not in "
                       r"the base parameters.*'params/Dense_0/kernel'"):
      checkpoint.load_transfer(tmp_path / "task", other)
    with pytest.raises(ValueError, match="holds no transfer artefact"):
      checkpoint.load_transfer(tmp_path / "nothing", params)
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel' is not in "
                       r"the changes"):
      checkpoint.save_transfer(tmp_path / "bad", {}, [LAYERS[1]])


def test_method_page_example_runs():
  page = (Path(__file__).resolve().parents[2] / "docs" / "methods"
          / "budgeted.md").read_text()
  code = re.search(r"# Budgeted transfer \(SWR/TAPS\)\n.*?```python\n(.*?)```",
                   page, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "docs/methods/budgeted.md", "exec"), namespace)
  assert namespace["selection"] == ("head/kernel",)  # body (16) exceeds 10.
  merged = budgeted.merge(namespace["base"], namespace["state"]["deltas"],
                          namespace["selection"])
  jax.tree.map(np.testing.assert_array_equal, namespace["task_params"], merged)
