"""Optimizers, the BatchNorm option and train steps, on the tiny stand-in."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from experiments.finetune.settings import FULL, METHODS, leaf_paths, leaf_roles
from experiments.finetune.training import (
    dropout_key, fine_tune, fresh_variables, init_optimizer_state, make_loss,
    make_optimizer, make_step)

BY_NAME = {method.name: method for method in METHODS}


@pytest.mark.parametrize("name, period", [
    ("multirate_classifier", 5), ("multirate_last_stage", 5),
    ("multirate_last_stage_k3", 3)])
def test_multirate_optimizer_labels_and_period(efficientnet_params, name,
                                               period):
  method = BY_NAME[name]
  assert FULL.period == 5
  optimizer = make_optimizer(method, {r: 0.1 for r in method.rate_names},
                             FULL, steps=10)
  state = jax.eval_shape(optimizer.init, efficientnet_params)
  roles = leaf_roles(method, efficientnet_params)
  assert state.labels == tuple(roles[p] for p in
                               leaf_paths(efficientnet_params))
  assert state.timetable.period == period


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batch_norm_option(tiny_pretrained, tiny_splits, bn):
  model, variables = fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  images, labels = tiny_splits.train.images[:16], tiny_splits.train.labels[:16]
  loss, batch_stats = jax.jit(make_loss(model, bn))(
      variables["params"], variables["batch_stats"], images, labels,
      dropout_key(0), 0)
  if bn == "frozen":  # Inference-mode BatchNorm: the running statistics.
    logits = model.apply(variables, images, train=False)
    expected_stats = variables["batch_stats"]
  else:  # The batch's statistics, running averages updated.
    logits, updated = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])
    expected_stats = updated["batch_stats"]
  np.testing.assert_allclose(loss, cross_entropy(logits, labels), rtol=1e-5)
  jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5),
               batch_stats, expected_stats)
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, b), batch_stats,
      variables["batch_stats"]))
  assert any(changed) == (bn == "train")


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batch_stats_over_training_steps(tiny_pretrained, tiny_splits, bn):
  pretrained = tiny_pretrained()
  model, variables = fresh_variables(pretrained, 0, 10)
  before = jax.tree.map(np.array, variables["batch_stats"])
  method = BY_NAME["multirate_classifier"]
  settings = dataclasses.replace(FULL, epochs=1, batch_size=16, bn=bn)
  optimizer = make_optimizer(method, {r: 0.01 for r in method.rate_names},
                             settings, steps=3)
  step = make_step(method, make_loss(model, bn), optimizer,
                   variables["params"])
  trained, _ = fine_tune(step, method, optimizer, variables,
                         tiny_splits.train, settings, 0, lambda: None)
  same = [np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(trained["batch_stats"]), jax.tree.leaves(before))]
  assert all(same) if bn == "frozen" else not any(same)


def test_plain_step_moves_only_the_trained_modules_by_sgd(tiny_pretrained,
                                                          tiny_splits):
  model, variables = fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  params = jax.tree.map(np.array, variables["params"])
  method, rate = BY_NAME["train_last_stage"], 0.1
  optimizer = make_optimizer(method, {"learning_rate": rate}, FULL, 10)
  loss_fn = make_loss(model, "frozen")
  args = (variables["batch_stats"], tiny_splits.train.images[:16],
          tiny_splits.train.labels[:16], dropout_key(0), 0)
  grads = jax.grad(lambda p: loss_fn(p, *args)[0])(params)
  step = make_step(method, loss_fn, optimizer, params)
  opt_state = init_optimizer_state(method, optimizer, variables["params"])
  new_params, _, _ = step(variables["params"], opt_state, *args)
  for name in params:  # First step: momentum buffer = gradient, decay = 1.
    expected = (jax.tree.map(lambda p, g: p - rate * g, params[name],
                             grads[name])
                if name in ("blocks_15", "head", "classifier")
                else params[name])
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5,
                                                         atol=1e-7),
                 new_params[name], expected)


@pytest.mark.parametrize("drift", [False, True])
def test_slow_rate_is_the_displacement_per_cycle(tiny_pretrained, tiny_splits,
                                                 drift):
  """h_S moves the slow parameters by h_S * g_S over a cycle, drift or not."""
  model, variables = fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  params = jax.tree.map(np.array, variables["params"])
  method = dataclasses.replace(BY_NAME["multirate_classifier"], drift=drift)
  settings = dataclasses.replace(FULL, momentum=0.0, period=4)
  rates = {"fast_learning_rate": 0.05, "slow_learning_rate": 0.2}
  # Decay over many steps: within one cycle the rate stays 1 to 1e-9.
  optimizer = make_optimizer(method, rates, settings, steps=10**6)
  loss_fn = make_loss(model, "frozen")
  batch = (tiny_splits.train.images[:16], tiny_splits.train.labels[:16])
  args = (variables["batch_stats"], *batch, dropout_key(0), 0)
  slow_grad = jax.grad(lambda p: loss_fn(p, *args)[0])(params)["blocks_14"]
  step = make_step(method, loss_fn, optimizer, params)
  state = (variables["params"], optimizer.init(variables["params"]))
  for number in range(settings.period):
    *state, _ = step(*state, variables["batch_stats"], *batch,
                     dropout_key(0), number)
    if number == 0 and not drift:  # All of it on the slow step.
      moved = jax.tree.map(np.array, state[0]["blocks_14"])
  if drift:  # Spread over the cycle.
    moved = state[0]["blocks_14"]
  jax.tree.map(lambda m, p, g: np.testing.assert_allclose(
      m, p - 0.2 * g, rtol=1e-5, atol=1e-7), moved, params["blocks_14"],
               slow_grad)
