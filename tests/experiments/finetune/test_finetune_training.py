"""Optimizers, the BatchNorm option, train steps and the training clock, on the
tiny stand-ins."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.finetune import selection
from experiments.finetune.experiment import run_experiment
from experiments.finetune.settings import Method, leaf_paths, leaf_roles
from experiments.finetune.tasks import VISION
from experiments.finetune.tasks.vision import FULL, METHODS
from experiments.finetune.training import (
    Examples, Plan, dropout_key, make_step, train_and_evaluate, warm_up)

BY_NAME = {method.name: method for method in METHODS}


@pytest.mark.parametrize("name, period", [
    ("multirate_classifier", 5), ("multirate_last_stage", 5),
    ("multirate_last_stage_k3", 3)])
def test_multirate_optimizer_labels_and_period(efficientnet_params, name,
                                               period):
  method = BY_NAME[name]
  assert FULL.period == 5
  optimizer = VISION.make_optimizer(
      method, {r: 0.1 for r in method.rate_names}, FULL, 10)
  state = jax.eval_shape(optimizer.init, efficientnet_params)
  roles = leaf_roles(method, efficientnet_params)
  assert state.labels == tuple(roles[p] for p in
                               leaf_paths(efficientnet_params))
  assert state.timetable.period == period


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batch_norm_option(tiny_pretrained, tiny_splits, bn):
  model, variables = VISION.fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  images, labels = tiny_splits.train.images[:16], tiny_splits.train.labels[:16]
  settings = dataclasses.replace(FULL, bn=bn)
  state = {"batch_stats": variables["batch_stats"]}
  loss, new_state = jax.jit(VISION.make_loss(model, settings))(
      variables["params"], state, images, labels, dropout_key(0), 0)
  if bn == "frozen":  # Inference-mode BatchNorm: the running statistics.
    logits = model.apply(variables, images, train=False)
    expected_stats = variables["batch_stats"]
  else:  # The batch's statistics, running averages updated.
    logits, updated = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])
    expected_stats = updated["batch_stats"]
  np.testing.assert_allclose(loss, cross_entropy(logits, labels), rtol=1e-5)
  jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5),
               new_state["batch_stats"], expected_stats)
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, b), new_state["batch_stats"],
      variables["batch_stats"]))
  assert any(changed) == (bn == "train")


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batch_stats_over_training_steps(tiny_pretrained, tiny_splits, bn):
  model, variables = VISION.fresh_variables(tiny_pretrained(), 0, 10)
  before = jax.tree.map(np.array, variables["batch_stats"])
  method = BY_NAME["multirate_classifier"]
  settings = dataclasses.replace(FULL, batch_size=16, bn=bn)
  optimizer = VISION.make_optimizer(
      method, {r: 0.01 for r in method.rate_names}, settings, 3)
  step = make_step(method, VISION.make_loss(model, settings), optimizer,
                   variables["params"])
  run = train_and_evaluate(step, method, optimizer, variables,
                           tiny_splits.train, Plan(3, 3), 16, 0)
  same = [np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(run.variables["batch_stats"]), jax.tree.leaves(before))]
  assert all(same) if bn == "frozen" else not any(same)


def fake_step(clock, seconds=1.0):
  """A step that takes ``seconds`` on ``clock`` and changes nothing."""

  def step(params, opt_state, state, inputs, labels, key, number):
    clock.now += seconds
    return params, opt_state, (jnp.zeros(()), state)

  return step


def test_evaluation_time_is_excluded_from_the_training_clock(fake_clock):
  clock, validated = fake_clock, []

  def validate(variables):
    clock.now += 100.0  # Evaluation is slow; it must not count.
    validated.append(clock.now)
    return len(validated) / 10

  data = Examples(np.zeros((10, 1), np.float32), np.zeros(10, np.int32))
  method = Method("train_all", "all")
  run = train_and_evaluate(fake_step(clock), method, optax.sgd(0.1),
                           {"params": {"w": jnp.zeros(2)}}, data,
                           Plan(steps=7, evaluate_every=3), 2, 0, validate,
                           clock)
  assert [p["train_seconds"] for p in run.points] == [0, 3, 6, 7]
  assert [p["step"] for p in run.points] == [0, 3, 6, 7]
  assert [p["epoch"] for p in run.points] == [0, 0.6, 1.2, 1.4]
  assert run.train_seconds == 7
  # Every point improved validation, so each was kept for testing.
  assert sorted(run.checkpoints) == [0, 1, 2, 3]
  # A budget re-plans the run to the 5 steps that fit at 1 s a step...
  budgeted = train_and_evaluate(fake_step(clock), method, optax.sgd(0.1),
                                {"params": {"w": jnp.zeros(2)}}, data,
                                Plan(steps=50, evaluate_every=3, budget=5.0),
                                2, 0, validate, clock)
  assert [p["train_seconds"] for p in budgeted.points] == [0, 3, 5]
  # ... and stops it at the first point at or past it when steps slow down.
  slowing, calls = fake_step(clock), []

  def slower(*args):
    calls.append(None)
    clock.now += 0.0 if len(calls) <= 3 else 2.0
    return slowing(*args)

  budgeted = train_and_evaluate(slower, method, optax.sgd(0.1),
                                {"params": {"w": jnp.zeros(2)}}, data,
                                Plan(steps=50, evaluate_every=3, budget=5.0),
                                2, 0, validate, clock)
  assert [p["train_seconds"] for p in budgeted.points] == [0, 3, 9]


def test_warm_up_times_compilation_apart_and_probes_the_step(fake_clock):
  clock, calls = fake_clock, []

  def step(params, opt_state, state, inputs, labels, key, number):
    calls.append(int(number))
    clock.now += 50.0 if len(calls) <= 2 else 2.0  # Compiling, then running.
    return params, opt_state, (jnp.zeros(()), state)

  data = Examples(np.zeros((10, 1), np.float32), np.zeros(10, np.int32))
  compile_seconds, step_seconds = warm_up(
      step, Method("train_all", "all"), optax.sgd(0.1),
      {"params": {"w": jnp.zeros(2)}}, data, 2, probe_steps=5, clock=clock)
  assert (compile_seconds, step_seconds) == (100.0, 2.0)
  assert calls == list(range(7))


def test_budgets_and_clock_of_a_whole_run_exclude_compilation_and_evaluation(
    tiny_pretrained, tiny_splits, tiny_settings, fake_clock, monkeypatch):
  """Each real step costs 1 s on a fake clock, its two compiling warm-up
  calls 1,000 s and every evaluation 100 s: train-all's time is its step
  count, and every other method plans and runs that many steps."""
  clock = fake_clock
  real_make_step, real_correct = selection.make_step, selection.correct

  def timed_make_step(*args):
    step, calls = real_make_step(*args), []

    def timed(*step_args):
      calls.append(None)
      clock.now += 1000.0 if len(calls) <= 2 else 1.0
      return step(*step_args)

    return timed

  def slow_correct(*args, **kwargs):
    clock.now += 100.0
    return real_correct(*args, **kwargs)

  monkeypatch.setattr(selection, "make_step", timed_make_step)
  monkeypatch.setattr(selection, "correct", slow_correct)
  settings = tiny_settings(VISION, image_size=8)
  methods = [BY_NAME[n] for n in ("train_classifier", "multirate_classifier",
                                  "train_all")]
  report = run_experiment(VISION, settings, tiny_splits, methods=methods,
                          pretrained=tiny_pretrained(), clock=clock)
  results = {r["name"]: r for r in report["methods"]}
  assert list(results)[0] == "train_all"  # First: it sets the budgets.
  steps = settings.epochs * (len(tiny_splits.train.labels) // 16)
  for name, result in results.items():
    assert result["compile_seconds"] == 2000.0
    run, = result["runs"]
    assert run["train_seconds"] == run["steps"] == steps
    assert run["budget_seconds"] == (None if name == "train_all" else steps)
    assert run["planned_steps"] == steps
    assert [p["train_seconds"] for p in run["points"]] == [
        p["step"] for p in run["points"]]
  assert results["train_all"]["probe_step_seconds"] is None
  assert results["multirate_classifier"]["probe_step_seconds"] == 1.0


def test_a_budgeted_run_re_plans_from_its_measured_speed(fake_clock):
  """The probe said 2 s a step, the steps take 1 s: at its first point the
  run re-plans to the budget's 20 steps and stretches its decay alike."""
  clock = fake_clock
  data = Examples(np.zeros((10, 1), np.float32), np.zeros(10, np.int32))
  method = Method("multirate", "m", fast=("a",))
  optimizer = VISION.make_optimizer(
      dataclasses.replace(method, rate_names=("fast_learning_rate",
                                              "slow_learning_rate")),
      {"fast_learning_rate": 0.1, "slow_learning_rate": 0.1},
      dataclasses.replace(FULL, period=5), 10)
  states = []

  def step(params, opt_state, state, inputs, labels, key, number):
    clock.now += 1.0
    states.append(opt_state)
    updates, opt_state = optimizer.update(
        jax.tree.map(jnp.ones_like, params), opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            (jnp.zeros(()), state))

  run = train_and_evaluate(
      step, method, optimizer, {"params": {"a": jnp.ones(2), "b": jnp.ones(2)}},
      data, Plan(steps=10, evaluate_every=5, budget=20.0, max_steps=100), 2, 0,
      lambda variables: 0.5, clock)
  assert [p["step"] for p in run.points] == [0, 5, 10, 15, 20]
  assert [p["planned_steps"] for p in run.points] == [10, 20, 20, 20, 20]
  assert run.train_seconds == 20
  totals = [float(x) for x in jax.tree.leaves(states[-1])
            if x.dtype == jnp.float32 and x.shape == () and float(x) in (
                20.0, 4.0, 10.0, 2.0)]
  assert totals == [20.0, 4.0]  # steps, and steps / k for the slow decay
  # Capped by max_steps, and never past the budget's first point.
  clock.now = 0.0
  run = train_and_evaluate(
      step, method, optimizer, {"params": {"a": jnp.ones(2), "b": jnp.ones(2)}},
      data, Plan(steps=10, evaluate_every=5, budget=20.0, max_steps=12), 2, 0,
      lambda variables: 0.5, clock)
  assert [p["step"] for p in run.points] == [0, 5, 10, 12]


def test_re_planning_does_not_compile_the_step_again(
    tiny_pretrained, tiny_splits, fake_clock):
  from _probes import count_compilations
  from experiments.finetune.optimizers import rescale_decay
  method = BY_NAME["multirate_last_stage"]
  settings = dataclasses.replace(FULL, batch_size=16, period=2)
  model, variables = VISION.fresh_variables(tiny_pretrained(), 0, 10)
  optimizer = VISION.make_optimizer(
      method, {r: 0.01 for r in method.rate_names}, settings, 4)
  step = make_step(method, VISION.make_loss(model, settings), optimizer,
                   variables["params"])
  warm_up(step, method, optimizer, variables, tiny_splits.train, 16)
  rescale_decay(optimizer.init(VISION.fresh_variables(
      tiny_pretrained(), 0, 10)[1]["params"]), 2.0)  # Eager ops compiled.

  def timed(*args):
    fake_clock.now += 1.0
    return step(*args)

  with count_compilations() as compilations:
    run = train_and_evaluate(
        timed, method, optimizer,
        VISION.fresh_variables(tiny_pretrained(), 0, 10)[1],
        tiny_splits.train, Plan(4, 2, budget=8.0, max_steps=20), 16, 0,
        lambda variables: 0.5, fake_clock)
  assert [p["planned_steps"] for p in run.points] == [4, 8, 8, 8, 8]
  assert compilations[0] == 0
