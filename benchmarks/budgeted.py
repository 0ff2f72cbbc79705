"""Budgeted transfer (SWR, TAPS) against the fine-tuning baselines.

The fine-tuning experiment's vision task (:mod:`experiments.finetune.tasks.vision`:
ImageNet EfficientNet-Lite0 on scikit-learn's digits at 32x32, its fixed
stratified split, BatchNorm statistics frozen, dropout and stochastic depth
on, SGD with momentum 0.9 and a cosine decay to 0): test accuracy against the
number of updated parameters. The candidate layers are the backbone's
convolution kernels (:func:`multirate_optax.budgeted.candidate_layers`,
every leaf of two or more dimensions but the classifier's); the new
classifier is trained by every method, and its parameters are counted.

Methods:

  head_only   the classifier alone (the experiment's ``train_classifier``).
  train_all   every parameter (the experiment's ``train_all``).
  multirate   the experiment's best multirate recipe on its full run: the
              last stage, conv head and classifier fast, drift, k = 5
              (``multirate_last_stage``); every parameter is updated.
  taps λ=…    TAPS (Wallingford et al., 2022): ``W_l = W0_l + 1[s_l >= 0.1]
              dW_l``, scores from 0.15, straight-through gradient, loss
              plus ``λ mean|s|`` after a warm-up; one row per λ. Its
              updated parameters are the layers whose gate is on in the
              reported checkpoint, plus the classifier; its checkpoints are
              eligible only once the penalty is on.
  swr b=…     SWR (Kim et al., 2023), per budget ``b`` (a share of the
              backbone's parameters): stage 1 trains every ``dW_l`` (all
              gates on); stage 2 trains one policy for every budget
              (:class:`multirate_optax.budgeted.Policy`, the budget as an
              input, one budget of the list per step in turn) on the task
              loss with straight-through Bernoulli gates
              (:func:`~multirate_optax.budgeted.sample_gates`) plus
              ``penalty_weight * max(0, expected cost / budget - 1)``, the
              stage-1 changes and classifier frozen; the layers are then
              chosen greedily by gate probability under the budget
              (:func:`~multirate_optax.budgeted.select_within_budget`, any
              probability, so the budget is filled); stage 3 trains only the
              chosen ``dW_l`` (from their stage-1 values) and the classifier
              with :func:`multirate_optax.train_step`, which does no
              backward work for the others. The reported model is
              :func:`~multirate_optax.budgeted.merge`'d. Its training time
              is all three stages (stages 1 and 2 are shared by the
              budgets).

Protocol: every run is evaluated on the validation split at evenly spaced
points (and before its first step) with the clock stopped; the reported model
is its best validation checkpoint (the earliest on ties); learning rates are
picked on the first seed's validation accuracy where a grid has several; the
test split is read only after every run and selection, and only for the
reported checkpoints. Training time is the training loop's wall-clock,
compilation excluded (each step program is compiled and timed on a throwaway
copy first: that probe gives the step times of stage 3 against stage 1).

The merged model is checked on the 5% budget: its logits against the
reparametrized model's, the text of its compiled inference program against
the original model's (the same program), and their inference times.

Run from the repository root::

  python -m benchmarks.budgeted            # quick: few epochs, one seed
  python -m benchmarks.budgeted --full     # the reported run

which writes ``benchmarks/results/budgeted_{quick,full}.{json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json
from experiments.data import Splits
from experiments.finetune.budget import chosen_index
from experiments.finetune.optimizers import cosine_decay, scale_by_rates
from experiments.finetune.reporting import machine
from experiments.finetune.selection import rate_candidates, select_rates
from experiments.finetune.settings import Method, top_module
from experiments.finetune.tasks.vision import VISION
from experiments.finetune.training import (
    Plan, accuracy, make_step, train_and_evaluate, warm_up)
from experiments.models.depthwise import depthwise_as_shifts
from multirate_optax import budgeted

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

PyTree = Any
RESULTS = Path(__file__).parent / "results"
CLASSIFIER = "classifier"
THRESHOLD, INITIAL_SCORE = 0.1, 0.15  # TAPS's tau and score init.
PLAIN = {"head_only": "train_classifier", "train_all": "train_all",
         "multirate": "multirate_last_stage"}


@dataclasses.dataclass(frozen=True)
class Config:
  """A run of the benchmark.

  Attributes:
    epochs: epochs of head-only, train-all, multirate and TAPS.
    stage_epochs: SWR's epochs of stage 1 (every change), stage 2 (the
      policy) and stage 3 (the chosen changes).
    budgets: SWR's budgets, as shares of the backbone's parameters.
    taps_weights: TAPS's penalty weights λ, one run each.
    warmup_epochs: TAPS's epochs before the penalty.
    rates: for each method, the candidates of each of its rates (picked on
      validation when there are several): ``learning_rate`` (every trained
      parameter; plain methods), ``fast_learning_rate`` and
      ``slow_learning_rate`` (multirate), ``delta_learning_rate`` and
      ``classifier_learning_rate`` (TAPS, SWR stages 1 and 3),
      ``score_learning_rate`` (TAPS), ``policy_learning_rate`` (SWR stage 2,
      Adam).
    budget_penalty_weight: SWR stage 2's weight on the budget penalty.
    seeds: seeds of the runs (classifier init, batch order, dropout, gates).
    evaluations: validation points per run (and one before the first step).
    batch_size: examples per step.
    image_size: side of the digit images.
    probe_steps: steps timed after compilation for the step-time ratios.
    label: ``'quick'`` or ``'full'``, the outputs' suffix.
  """
  epochs: int
  stage_epochs: tuple[int, int, int]
  budgets: tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
  taps_weights: tuple[float, ...] = (1.0,)
  warmup_epochs: int = 1
  rates: Mapping[str, Mapping[str, tuple[float, ...]]] = dataclasses.field(
      default_factory=dict)
  budget_penalty_weight: float = 1.0
  seeds: tuple[int, ...] = (0,)
  evaluations: int = 6
  batch_size: int = 32
  image_size: int = 32
  probe_steps: int = 10
  label: str = "quick"


# The plain methods' rates are the fine-tuning experiment's selections on
# validation (benchmarks/results/finetune_full.json).
_PLAIN_RATES = {
    "head_only": {"learning_rate": (0.1,)},
    "train_all": {"learning_rate": (0.001,)},
    "multirate": {"fast_learning_rate": (0.003,),
                  "slow_learning_rate": (0.003,)},
}
QUICK = Config(
    epochs=3, stage_epochs=(2, 1, 2), taps_weights=(1.0,),
    rates={**_PLAIN_RATES,
           "taps": {"delta_learning_rate": (0.003,),
                    "classifier_learning_rate": (0.01,),
                    "score_learning_rate": (0.01,)},
           "swr": {"delta_learning_rate": (0.003,),
                   "classifier_learning_rate": (0.01,),
                   "policy_learning_rate": (0.01,)}},
    evaluations=4, label="quick")
# Sized for a shared 2-core CPU (about half an hour): one seed, TAPS at
# three penalty weights to spread its numbers of updated parameters.
FULL = dataclasses.replace(
    QUICK, epochs=6, stage_epochs=(4, 1, 3), taps_weights=(1.0, 4.0, 16.0),
    seeds=(0,), evaluations=6, label="full",
    # Train-all's rate again on validation: the reparametrized methods'
    # change rate (0.003) against the experiment's 20-epoch choice (0.001).
    rates={**QUICK.rates, "train_all": {"learning_rate": (0.001, 0.003)}})


# ----------------------------------------------------------------------------
# The model's pieces.


@dataclasses.dataclass
class Task:
  """The model, its data and its evaluation, shared by every method of a seed.

  Attributes:
    model: the network.
    variables: its pretrained variables with the seed's new classifier;
      kept unchanged (every run gets a copy).
    layers: the candidate layers.
    sizes: their numbers of parameters.
    base_loss: ``loss(params, state, images, labels, key, step)`` of the
      vision task.
    predict: jitted predicted classes.
  """
  model: Any
  variables: PyTree
  layers: tuple[str, ...]
  sizes: dict[str, int]
  base_loss: Callable[..., Any]
  predict: Callable[..., Any]

  @property
  def params(self) -> PyTree:
    return self.variables["params"]

  @property
  def classifier_size(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params[CLASSIFIER]))

  @property
  def backbone_size(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params)) - (
        self.classifier_size)

  def fresh(self) -> PyTree:
    """A copy of the variables: train steps donate their buffers."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), self.variables)


def vision_settings(config: Config):
  return dataclasses.replace(VISION.quick, image_size=config.image_size,
                             batch_size=config.batch_size, bn="frozen")


def make_task(pretrained: Any, seed: int, num_classes: int,
              config: Config) -> Task:
  model, variables = VISION.fresh_variables(pretrained, seed, num_classes)
  layers = budgeted.candidate_layers(variables["params"],
                                     exclude=f"^{CLASSIFIER}/")
  return Task(model, variables, layers,
              budgeted.layer_sizes(variables["params"], layers),
              VISION.make_loss(model, vision_settings(config)),
              VISION.make_predict(model))


def trainable(task: Task, deltas: Optional[PyTree] = None, **more) -> PyTree:
  """The trained tree of a reparametrized method: the changes (zeros unless
  given), a copy of the classifier, and ``more`` (TAPS's scores)."""
  if deltas is None:
    deltas = budgeted.init_deltas(task.params, task.layers)
  classifier = jax.tree.map(lambda x: jnp.array(x, copy=True),
                            task.params[CLASSIFIER])
  return {"deltas": deltas, CLASSIFIER: classifier, **more}


def frozen_state(task: Task, **more) -> PyTree:
  """What a reparametrized step takes besides its trained tree: the frozen
  weights (an argument, not a constant baked into the program), BatchNorm
  statistics, and ``more``."""
  return {"base": task.params, "batch_stats": task.variables["batch_stats"],
          **more}


def effective_params(base: PyTree, trained: PyTree, gates: Mapping[str, Any],
                     layers: Optional[Sequence[str]] = None) -> PyTree:
  """``W0 + g dW`` for ``layers`` (default every change), and the classifier."""
  deltas = trained["deltas"]
  if layers is not None:
    deltas = {layer: deltas[layer] for layer in layers}
    gates = {layer: gates[layer] for layer in layers}
  params = budgeted.apply_deltas(base, deltas, gates)
  return {**params, CLASSIFIER: trained[CLASSIFIER]}


def merged_variables(task: Task, trained: PyTree,
                     selection: Sequence[str]) -> PyTree:
  """The plain variables of the adapted model: the chosen changes folded in."""
  params = budgeted.merge(task.params, trained["deltas"], selection)
  return {"params": {**params, CLASSIFIER: trained[CLASSIFIER]},
          "batch_stats": task.variables["batch_stats"]}


def reparametrized_optimizer(rates: Mapping[str, float],
                             steps: int) -> optax.GradientTransformation:
  """SGD with momentum 0.9, a cosine decay over ``steps``, one rate per
  top-level entry of the trained tree (``deltas``, ``classifier``,
  ``scores``); the numbers live in the state, so one step serves every run."""
  names = {"deltas": "delta_learning_rate",
           CLASSIFIER: "classifier_learning_rate",
           "scores": "score_learning_rate"}
  return optax.chain(
      optax.trace(decay=0.9), cosine_decay(steps),
      scale_by_rates({group: rates[name] for group, name in names.items()
                      if name in rates}, top_module))


# ----------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class Trained:
  """One method's run on one seed, before testing.

  Attributes:
    name: the row of the table.
    run: the training run (points, checkpoints, time).
    plan: its plan.
    rates: the rates it used; ``selection`` their validation scores.
    to_variables: a checkpoint to the plain variables of the model it
      reports (merged for the reparametrized methods).
    updated: a checkpoint to the number of parameters the model changes.
    extra: method-specific entries of the report.
  """
  name: str
  run: Any
  plan: Plan
  rates: dict[str, float]
  selection: list[dict[str, Any]]
  to_variables: Callable[[PyTree], PyTree]
  updated: Callable[[PyTree], int]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Only the reported checkpoint is kept (the others would hold every
    # run's weights in memory), without the frozen weights.
    index = chosen_index(self.run.points, math.inf)
    checkpoint = self.run.checkpoints[index]
    if "base" in checkpoint:
      checkpoint = {"params": checkpoint["params"]}
    self.run = self.run._replace(checkpoints={index: checkpoint},
                                 variables=None)

  def chosen(self) -> tuple[int, PyTree]:
    """The reported checkpoint (best validation accuracy, earliest on ties)
    and its index among the points."""
    (index, checkpoint), = self.run.checkpoints.items()
    return index, checkpoint


class Runner:
  """Trains the methods of one seed; every accuracy goes through
  :func:`accuracy` on the validation split (tests spy on it)."""

  def __init__(self, task: Task, splits: Splits, config: Config, seed: int,
               chosen_rates: dict[str, dict[str, float]],
               clock: Callable[[], float]):
    self.task, self.splits, self.config, self.seed = task, splits, config, seed
    self.chosen_rates = chosen_rates  # Picked on the first seed, reused.
    self.clock = clock
    self.steps_per_epoch = len(splits.train.labels) // config.batch_size
    self.eval_batch_size = 4 * config.batch_size
    self.taps_step = None
    self.stage3_steps: dict[tuple[str, ...], Any] = {}

  def plan(self, epochs: int) -> Plan:
    steps = max(1, epochs * self.steps_per_epoch)
    return Plan(steps, max(1, math.ceil(steps / self.config.evaluations)))

  def validate(self, to_variables) -> Callable[[PyTree], float]:
    return lambda checkpoint: accuracy(
        self.task.predict, to_variables(checkpoint), self.splits.validation,
        self.eval_batch_size)

  def with_rates(self, key: str, grid: Mapping[str, Sequence[float]],
                 train: Callable[[dict[str, float]], Trained]) -> Trained:
    """``train(rates)`` with the rates picked on validation (first seed) or
    reused (later seeds)."""
    if key in self.chosen_rates:
      return train(self.chosen_rates[key])
    runs = {}

    def score(rates):
      runs[repr(rates)] = trained = train(rates)
      points = trained.run.points
      return points[chosen_index(points, math.inf)]["validation_accuracy"]

    rates, scores = select_rates(rate_candidates(grid), score)
    self.chosen_rates[key] = rates
    result = runs.get(repr(rates)) or train(rates)
    result.selection = scores
    return result

  def timed_steps(self, step, method: Method, optimizer, variables) -> dict:
    compile_seconds, step_seconds = warm_up(
        step, method, optimizer, variables, self.splits.train,
        self.config.batch_size, probe_steps=self.config.probe_steps,
        clock=self.clock)
    return {"compile_seconds": compile_seconds, "step_seconds": step_seconds}

  # -- The fine-tuning experiment's methods. --

  def plain(self, name: str) -> Trained:
    method = VISION.method(PLAIN[name])
    settings = vision_settings(self.config)
    plan = self.plan(self.config.epochs)
    optimizer = lambda rates: VISION.make_optimizer(method, rates, settings,
                                                    plan.steps)
    grid = self.config.rates[name]
    step = make_step(method, self.task.base_loss,
                     optimizer(rate_candidates(grid)[0]), self.task.params)
    timing = self.timed_steps(step, method, optimizer(rate_candidates(grid)[0]),
                              self.task.fresh())
    if name == "head_only":
      updated = self.task.classifier_size
    else:  # Train-all and multirate change every parameter.
      updated = self.task.backbone_size + self.task.classifier_size

    def train(rates):
      run = train_and_evaluate(
          step, method, optimizer(rates), self.task.fresh(), self.splits.train,
          plan, self.config.batch_size, self.seed,
          self.validate(lambda checkpoint: checkpoint), self.clock)
      return Trained(name, run, plan, rates, [], lambda checkpoint: checkpoint,
                     lambda checkpoint: updated, dict(timing))

    return self.with_rates(name, grid, train)

  # -- TAPS. --

  def taps(self, weight: float) -> Trained:
    task, config = self.task, self.config
    plan = self.plan(config.epochs)
    warmup_steps = config.warmup_epochs * self.steps_per_epoch
    method = Method(f"taps_{weight:g}", "TAPS")

    def loss(trained, state, images, labels, key, step):
      gates = budgeted.threshold_gates(trained["scores"], THRESHOLD)
      params = effective_params(state["base"], trained, gates)
      value, _ = task.base_loss(params, {"batch_stats": state["batch_stats"]},
                                images, labels, key, step)
      on = budgeted.penalty_weight(step, 1.0, warmup_steps)
      penalty = state["penalty_weight"] * on * budgeted.sparsity_penalty(
          trained["scores"])
      return value + penalty, state

    def start():
      return {"params": trainable(task, scores=budgeted.init_scores(
                  task.layers, INITIAL_SCORE)),
              **frozen_state(task, penalty_weight=jnp.float32(weight))}

    def gate_on(checkpoint):
      scores = checkpoint["params"]["scores"]
      return tuple(l for l in task.layers if float(scores[l]) >= THRESHOLD)

    def to_variables(checkpoint):
      return merged_variables(task, checkpoint["params"], gate_on(checkpoint))

    def updated(checkpoint):
      return sum(task.sizes[l] for l in gate_on(checkpoint)) + (
          task.classifier_size)

    grid = config.rates["taps"]
    optimizer = lambda rates: reparametrized_optimizer(rates, plan.steps)
    if self.taps_step is None:  # λ is in the state: one program for all.
      step = make_step(method, loss, optimizer(rate_candidates(grid)[0]),
                       start()["params"])
      self.taps_step = step, self.timed_steps(
          step, method, optimizer(rate_candidates(grid)[0]), start())
    step, timing = self.taps_step
    validation = self.validate(to_variables)
    interval = plan.evaluate_every

    def train(rates):
      calls = 0

      def validate_after_warmup(checkpoint):
        # Evaluation points come at 0, interval, 2 interval, ..., and at the
        # last step; the gates are decided only once the penalty is on.
        nonlocal calls
        at = min(calls * interval, plan.steps)
        calls += 1
        return validation(checkpoint) if at >= warmup_steps else math.nan

      run = train_and_evaluate(
          step, method, optimizer(rates), start(), self.splits.train, plan,
          config.batch_size, self.seed, validate_after_warmup, self.clock)
      return Trained(f"taps λ={weight:g}", run, plan, rates, [], to_variables,
                     updated, {**timing, "penalty_weight": weight,
                               "final_gates_on": len(gate_on(run.variables))})

    return self.with_rates(f"taps λ={weight:g}", grid, train)

  # -- SWR. --

  def swr(self) -> list[Trained]:
    task, config = self.task, self.config
    rates_grid = config.rates["swr"]
    rates = self.chosen_rates.get("swr") or rate_candidates(rates_grid)[0]
    self.chosen_rates["swr"] = rates
    stage1, deltas, classifier = self.swr_stage1(rates)
    policy_params, stage2 = self.swr_stage2(rates, deltas, classifier)
    features = budgeted.layer_features(task.params, deltas, task.layers)
    policy = budgeted.Policy(task.layers)
    total = sum(task.sizes.values())
    results = []
    for share in config.budgets:
      budget = max(1, int(share * task.backbone_size))
      probabilities = policy.apply(policy_params, features, budget / total)
      selection = budgeted.select_within_budget(
          probabilities, task.sizes, budget, threshold=0.0)
      results.append(self.swr_stage3(
          share, budget, selection, rates, deltas, classifier, stage1, stage2,
          {l: float(p) for l, p in probabilities.items()}))
    return results

  def swr_stage1(self, rates) -> tuple[dict, PyTree, PyTree]:
    """Every change trained, gates on; a plain timed run."""
    task, config = self.task, self.config
    method = Method("swr_stage1", "SWR stage 1")
    plan = self.plan(config.stage_epochs[0])
    ones = {layer: 1.0 for layer in task.layers}

    def loss(trained, state, images, labels, key, step):
      params = effective_params(state["base"], trained, ones)
      value, _ = task.base_loss(params, {"batch_stats": state["batch_stats"]},
                                images, labels, key, step)
      return value, state

    start = lambda: {"params": trainable(task), **frozen_state(task)}
    optimizer = reparametrized_optimizer(rates, plan.steps)
    step = make_step(method, loss, optimizer, start()["params"])
    timing = self.timed_steps(step, method, optimizer, start())
    run = train_and_evaluate(step, method, optimizer, start(),
                             self.splits.train, plan, config.batch_size,
                             self.seed, None, self.clock)
    trained = run.variables["params"]
    return ({**timing, "train_seconds": run.train_seconds,
             "steps": plan.steps}, trained["deltas"], trained[CLASSIFIER])

  def swr_stage2(self, rates, deltas, classifier) -> tuple[PyTree, dict]:
    """One policy for every budget: the changes and classifier frozen."""
    task, config = self.task, self.config
    method = Method("swr_stage2", "SWR stage 2")
    plan = self.plan(config.stage_epochs[1])
    policy = budgeted.Policy(task.layers)
    total = sum(task.sizes.values())
    budgets = [max(1, int(share * task.backbone_size))
               for share in config.budgets]
    features = budgeted.layer_features(task.params, deltas, task.layers)
    weight = config.budget_penalty_weight

    def loss(policy_params, state, images, labels, key, step):
      # The budgets take turns, one per step; budget_penalty wants a
      # concrete budget, so the same formula is written here for a traced one.
      budget = state["budgets"][step % len(budgets)]
      probabilities = policy.apply(policy_params, state["features"],
                                   budget / total)
      gates = budgeted.sample_gates(
          jax.random.fold_in(jax.random.fold_in(key, step), 1), probabilities)
      params = effective_params(state["base"], state["trained"], gates)
      value, _ = task.base_loss(params, {"batch_stats": state["batch_stats"]},
                                images, labels, key, step)
      cost = budgeted.expected_cost(probabilities, task.sizes)
      return value + weight * jax.nn.relu(cost / budget - 1.0), state

    def start():
      frozen = {"deltas": deltas, CLASSIFIER: classifier}
      # Strong float32: Policy.init's output bias is weak-typed, and the
      # step would compile again once its first update made it strong.
      policy_params = jax.tree.map(
          lambda x: x.astype(jnp.float32),
          policy.init(jax.random.key(self.seed), features.shape[1]))
      return {"params": policy_params,
              **frozen_state(task, trained=frozen, features=features,
                             budgets=jnp.asarray(budgets, jnp.float32))}

    optimizer = optax.adam(rates["policy_learning_rate"])
    step = make_step(method, loss, optimizer, start()["params"])
    timing = self.timed_steps(step, method, optimizer, start())
    run = train_and_evaluate(step, method, optimizer, start(),
                             self.splits.train, plan, config.batch_size,
                             self.seed, None, self.clock)
    return run.variables["params"], {**timing, "train_seconds":
                                     run.train_seconds, "steps": plan.steps}

  def swr_stage3(self, share, budget, selection, rates, deltas, classifier,
                 stage1, stage2, probabilities) -> Trained:
    """The chosen changes and the classifier; no backward for the others."""
    task, config = self.task, self.config
    method = Method(f"swr_{share:g}", "SWR stage 3")
    plan = self.plan(config.stage_epochs[2])
    ones = {layer: 1.0 for layer in selection}

    def loss(trained, state, images, labels, key, step):
      params = effective_params(state["base"], trained, ones, selection)
      value, _ = task.base_loss(params, {"batch_stats": state["batch_stats"]},
                                images, labels, key, step)
      return value, state

    def start():
      copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
      return {"params": trainable(task, copy(deltas)), **frozen_state(task)}

    optimizer = transfer_optimizer(selection, rates, plan.steps,
                                   start()["params"])
    step = self.stage3_step(selection, loss, optimizer)
    timing = self.timed_steps(step, method, optimizer, start())
    timing["step_time_vs_all_changes"] = self.step_time_ratio(
        selection, rates, plan.steps, start)
    to_variables = lambda checkpoint: merged_variables(
        task, checkpoint["params"], selection)
    run = train_and_evaluate(step, method, optimizer, start(),
                             self.splits.train, plan, config.batch_size,
                             self.seed, self.validate(to_variables),
                             self.clock)
    updated = sum(task.sizes[l] for l in selection) + task.classifier_size
    shared_seconds = stage1["train_seconds"] + stage2["train_seconds"]
    return Trained(
        f"swr b={share:g}", run, plan, rates, [], to_variables,
        lambda checkpoint: updated,
        {**timing, "budget": budget, "budget_share": share,
         "selection": list(selection), "selected_parameters": sum(
             task.sizes[l] for l in selection),
         "probabilities": probabilities, "stage1": stage1, "stage2": stage2,
         "stage3_seconds": run.train_seconds,
         "shared_seconds": shared_seconds})

  def stage3_step(self, selection: Sequence[str], loss, optimizer):
    """Stage 3's compiled step for ``selection`` (one per selection)."""
    key = tuple(selection)
    if key not in self.stage3_steps:
      self.stage3_steps[key] = mo.train_step(loss, optimizer, has_aux=True)
    return self.stage3_steps[key]

  def step_time_ratio(self, selection, rates, steps, start) -> float:
    """Stage 3's step time over that of the same step training every
    change: the two timed in turns (a few steps each, after compilation),
    the ratio of their fastest turns, so that load on a shared machine
    falls on both."""
    task = self.task
    every = task.layers
    ones = {layer: 1.0 for layer in every}

    def loss_all(trained, state, images, labels, key, step):
      params = effective_params(state["base"], trained, ones, every)
      value, _ = task.base_loss(params, {"batch_stats": state["batch_stats"]},
                                images, labels, key, step)
      return value, state

    timed = {}
    for name, layers in (("selected", selection), ("all", every)):
      optimizer = transfer_optimizer(layers, rates, steps, start()["params"])
      step = self.stage3_steps.get(tuple(layers)) or self.stage3_step(
          layers, loss_all, optimizer)
      variables = start()
      params, state = variables["params"], {
          k: v for k, v in variables.items() if k != "params"}
      timed[name] = [step, params, optimizer.init(params), state, []]
    batch = (self.splits.train[0][:self.config.batch_size],
             self.splits.train[1][:self.config.batch_size])
    key = jax.random.key(0, impl="rbg")
    for turn in range(4):
      for name, entry in timed.items():
        step, params, opt_state, state, seconds = entry
        begin = self.clock()
        for number in range(max(2, self.config.probe_steps // 2)):
          params, opt_state, (_, state) = step(
              params, opt_state, state, *batch, key, np.int32(number))
        jax.block_until_ready(params)
        if turn:  # The first turn compiles (or warms) the programs.
          seconds.append(self.clock() - begin)
        entry[1:4] = params, opt_state, state
    return min(timed["selected"][4]) / max(min(timed["all"][4]), 1e-12)


def transfer_optimizer(selection: Sequence[str], rates: Mapping[str, float],
                       steps: int, trained: PyTree
                       ) -> optax.GradientTransformation:
  """Stage 3's optimizer: :func:`multirate_optax.budgeted.transfer` on the
  trained tree, only the chosen changes and the classifier active."""
  return budgeted.transfer(selection, reparametrized_optimizer(rates, steps),
                           trained["deltas"], also_train=f"^{CLASSIFIER}/")


# ----------------------------------------------------------------------------
# The whole benchmark.


def run_benchmark(config: Config, splits: Optional[Splits] = None,
                  pretrained: Any = None,
                  clock: Callable[[], float] = time.perf_counter,
                  check_merge: bool = True) -> dict[str, Any]:
  """Every method on every seed, tested after training; the report."""
  settings = vision_settings(config)
  if splits is None:
    splits = VISION.load_splits(settings, None)
  if pretrained is None:
    pretrained = VISION.load_pretrained()
  start, machine_before = time.perf_counter(), machine()
  chosen_rates: dict[str, dict[str, float]] = {}
  trained_by_seed, tasks = {}, {}
  for seed in config.seeds:
    task = tasks[seed] = make_task(pretrained, seed, splits.num_classes,
                                   config)
    runner = Runner(task, splits, config, seed, chosen_rates, clock)
    rows = [runner.plain(name) for name in PLAIN]
    rows += [runner.taps(weight) for weight in config.taps_weights]
    rows += runner.swr()
    trained_by_seed[seed] = rows
    print(f"seed {seed}: trained {len(rows)} runs", flush=True)
  # The test split is read here only, after every run and every selection,
  # and only for each run's reported (best validation) checkpoint.
  runs = []
  steps_per_epoch = len(splits.train.labels) // config.batch_size
  for seed, rows in trained_by_seed.items():
    for trained in rows:
      index, checkpoint = trained.chosen()
      test_accuracy = accuracy(tasks[seed].predict,
                               trained.to_variables(checkpoint), splits.test,
                               4 * config.batch_size)
      runs.append({
          "method": trained.name, "seed": seed, "rates": trained.rates,
          "rate_selection": trained.selection,
          "steps": trained.plan.steps,
          "epochs": trained.plan.steps / steps_per_epoch,
          "train_seconds": trained.run.train_seconds,
          "points": [{key: (None if isinstance(value, float)
                            and math.isnan(value) else value)
                      for key, value in point.items()}
                     for point in trained.run.points],
          "chosen_point": index,
          "validation_accuracy":
              trained.run.points[index]["validation_accuracy"],
          "test_accuracy": test_accuracy,
          "updated_parameters": trained.updated(checkpoint),
          **trained.extra})
  first = tasks[config.seeds[0]]
  report = {
      "config": dataclasses.asdict(config),
      "description": describe(config),
      "machine_at_start": machine_before,
      "split_sizes": {name: len(getattr(splits, name).labels)
                      for name in Splits._fields},
      "candidate_layers": len(first.layers),
      "candidate_parameters": sum(first.sizes.values()),
      "backbone_parameters": first.backbone_size,
      "classifier_parameters": first.classifier_size,
      "runs": runs,
  }
  report["summary"] = summarise(runs, config)
  if check_merge:
    five = next(row for row in trained_by_seed[config.seeds[0]]
                if row.name == "swr b=0.05") if 0.05 in config.budgets else (
                    trained_by_seed[config.seeds[0]][-1])
    report["merged_inference"] = merged_inference(first, five, splits, config)
  report["targets"] = targets(report["summary"], report.get("merged_inference"))
  report["load_average_at_end"] = os.getloadavg()
  report["wall_seconds"] = time.perf_counter() - start
  return report


def describe(config: Config) -> str:
  return (f"{config.label.upper()} RUN: EfficientNet-Lite0 -> digits "
          f"{config.image_size}x{config.image_size}, BatchNorm frozen, batch "
          f"{config.batch_size}, {config.epochs} epochs (SWR stages "
          f"{'+'.join(map(str, config.stage_epochs))}), seeds "
          f"{list(config.seeds)}")


def merged_inference(task: Task, trained: Trained, splits: Splits,
                     config: Config, repeats: int = 7) -> dict[str, Any]:
  """The merged model against the reparametrized one and the original."""
  _, checkpoint = trained.chosen()
  selection = trained.extra["selection"]
  merged = trained.to_variables(checkpoint)
  images = jnp.asarray(splits.test.images[:4 * config.batch_size])

  def logits(variables, images):
    return task.model.apply(variables, images)

  def reparametrized_logits(trained_tree, state, images):
    params = effective_params(state["base"], trained_tree,
                              {l: 1.0 for l in selection}, selection)
    return task.model.apply({"params": params,
                             "batch_stats": state["batch_stats"]}, images)

  with depthwise_as_shifts():
    plain = jax.jit(logits)
    unmerged = jax.jit(reparametrized_logits)
    state = frozen_state(task)
    same_program = (plain.lower(merged, images).as_text()
                    == plain.lower(task.variables, images).as_text())
    merged_out = np.asarray(plain(merged, images))
    unmerged_out = np.asarray(unmerged(checkpoint["params"], state, images))
    times = {"merged": [], "original": [], "reparametrized": []}
    calls = {"merged": lambda: plain(merged, images),
             "original": lambda: plain(task.variables, images),
             "reparametrized": lambda: unmerged(checkpoint["params"], state,
                                                images)}
    for _ in range(repeats):  # Interleaved, so load changes hit all three.
      for name, call in calls.items():
        jax.block_until_ready(call())
        begin = time.perf_counter()
        for _ in range(10):
          out = call()
        jax.block_until_ready(out)
        times[name].append((time.perf_counter() - begin) / 10)
  # The fastest repeat: the least disturbed by other work on the machine.
  fastest = {name: min(values) for name, values in times.items()}
  return {
      "method": trained.name,
      "same_program_as_original": same_program,
      "outputs_equal": bool(np.array_equal(merged_out, unmerged_out)),
      "max_abs_logit_difference": float(np.max(np.abs(merged_out
                                                      - unmerged_out))),
      "seconds_per_batch": fastest,
      "merged_vs_original": fastest["merged"] / fastest["original"],
      "reparametrized_vs_original":
          fastest["reparametrized"] / fastest["original"],
      "batch": int(images.shape[0]),
  }


def summarise(runs: Sequence[Mapping[str, Any]],
              config: Config) -> list[dict[str, Any]]:
  """One row per method: means (and sd) over seeds."""
  names = list(dict.fromkeys(run["method"] for run in runs))
  rows = []
  for name in names:
    mine = [run for run in runs if run["method"] == name]
    accuracies = [100 * run["test_accuracy"] for run in mine]
    seconds = [run["train_seconds"] + run.get("shared_seconds", 0.0)
               for run in mine]
    row = {
        "method": name,
        "test_accuracy_mean": statistics.mean(accuracies),
        "test_accuracy_std": (statistics.stdev(accuracies)
                              if len(accuracies) > 1 else 0.0),
        "updated_parameters_mean": statistics.mean(
            run["updated_parameters"] for run in mine),
        "train_seconds_mean": statistics.mean(seconds),
        "step_seconds_mean": statistics.mean(
            run["step_seconds"] for run in mine),
        "seeds": len(mine),
    }
    if "budget" in mine[0]:
      row.update(
          budget=mine[0]["budget"], budget_share=mine[0]["budget_share"],
          selected_parameters_max=max(run["selected_parameters"]
                                      for run in mine),
          within_budget=all(run["selected_parameters"] <= run["budget"]
                            for run in mine),
          layers_selected_mean=statistics.mean(len(run["selection"])
                                               for run in mine),
          stage3_seconds_mean=statistics.mean(run["stage3_seconds"]
                                              for run in mine),
          step_time_vs_all_changes=statistics.mean(
              run["step_time_vs_all_changes"] for run in mine))
    rows.append(row)
  return rows


def targets(summary: Sequence[Mapping[str, Any]],
            merged: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """The issue's targets, as measured."""
  rows = {row["method"]: row for row in summary}
  swr = [row for row in summary if row["method"].startswith("swr")]
  taps = [row for row in summary if row["method"].startswith("taps")]
  result: dict[str, Any] = {}
  five = rows.get("swr b=0.05")
  if five and "train_all" in rows:
    gap = rows["train_all"]["test_accuracy_mean"] - five["test_accuracy_mean"]
    result["five_percent_vs_train_all_points"] = -gap
    result["five_percent_within_1_point"] = gap <= 1.0
  comparisons = []
  for row in swr:
    # TAPS runs that changed no more parameters than this SWR model.
    fewer = [t for t in taps if t["updated_parameters_mean"]
             <= row["updated_parameters_mean"]]
    nearest = min(taps, key=lambda t: abs(
        math.log(t["updated_parameters_mean"])
        - math.log(row["updated_parameters_mean"]))) if taps else None
    comparisons.append({
        "swr": row["method"], "swr_accuracy": row["test_accuracy_mean"],
        "swr_updated": row["updated_parameters_mean"],
        "taps_with_no_more_parameters": [
            (t["method"], t["test_accuracy_mean"],
             t["updated_parameters_mean"]) for t in fewer],
        "at_least_as_accurate_as_those": all(
            row["test_accuracy_mean"] >= t["test_accuracy_mean"]
            for t in fewer),
        "nearest_taps": nearest and (nearest["method"],
                                     nearest["test_accuracy_mean"],
                                     nearest["updated_parameters_mean"]),
    })
  result["swr_vs_taps"] = comparisons
  if merged:
    result["merged_same_program"] = merged["same_program_as_original"]
    result["merged_vs_original_time"] = merged["merged_vs_original"]
  return result


def print_table(report: Mapping[str, Any]) -> None:
  print(report["description"])
  print(f"backbone {report['backbone_parameters']:,} parameters "
        f"({report['candidate_layers']} candidate layers, "
        f"{report['candidate_parameters']:,}); classifier "
        f"{report['classifier_parameters']:,}")
  header = (f"{'method':<14} {'test acc %':>13} {'updated params':>15} "
            f"{'train s':>8} {'step ms':>8} {'step vs all dW':>14}")
  print(header)
  print("-" * len(header))
  for row in report["summary"]:
    ratio = row.get("step_time_vs_all_changes")
    print(f"{row['method']:<14} {row['test_accuracy_mean']:>7.2f} ± "
          f"{row['test_accuracy_std']:<4.2f} "
          f"{row['updated_parameters_mean']:>15,.0f} "
          f"{row['train_seconds_mean']:>8.1f} "
          f"{1000 * row['step_seconds_mean']:>8.1f} "
          f"{'' if ratio is None else f'{ratio:.2f}':>14}")
  merged = report.get("merged_inference")
  if merged:
    print(f"merged ({merged['method']}): same program as the original: "
          f"{merged['same_program_as_original']}; outputs equal to the "
          f"reparametrized model's: {merged['outputs_equal']} (max "
          f"|difference| {merged['max_abs_logit_difference']:.2g}); "
          f"inference time merged/original "
          f"{merged['merged_vs_original']:.3f}, reparametrized/original "
          f"{merged['reparametrized_vs_original']:.3f}")
  goals = report["targets"]
  if "five_percent_within_1_point" in goals:
    print(f"target: 5% budget within 1 point of train-all: "
          f"{'MET' if goals['five_percent_within_1_point'] else 'MISSED'} "
          f"({goals['five_percent_vs_train_all_points']:+.2f} points)")
  for comparison in goals["swr_vs_taps"]:
    compared = len(comparison["taps_with_no_more_parameters"])
    verdict = ("no TAPS run changed as few parameters" if not compared else
               "MET" if comparison["at_least_as_accurate_as_those"]
               else "MISSED")
    print(f"target: {comparison['swr']} at least as accurate as TAPS runs "
          f"with no more updated parameters: {verdict} ({compared} such "
          f"runs)")


def plot(report: Mapping[str, Any], path: Path) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  rows = report["summary"]
  for prefix, style, label in (("swr", "o-", "SWR"), ("taps", "s--", "TAPS")):
    mine = sorted((r for r in rows if r["method"].startswith(prefix)),
                  key=lambda r: r["updated_parameters_mean"])
    if mine:
      ax.errorbar([r["updated_parameters_mean"] for r in mine],
                  [r["test_accuracy_mean"] for r in mine],
                  yerr=[r["test_accuracy_std"] for r in mine], fmt=style,
                  label=label, capsize=3)
  for row in rows:
    if row["method"] in PLAIN:
      ax.errorbar([row["updated_parameters_mean"]],
                  [row["test_accuracy_mean"]],
                  yerr=[row["test_accuracy_std"]], fmt="^", capsize=3,
                  label=row["method"].replace("_", "-"))
  ax.set_xscale("log")
  ax.set_xlabel("updated parameters (classifier included)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(report["description"], fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--full", action="store_true",
                      help="the reported run (default: quick)")
  parser.add_argument("--seeds", type=int, help="number of seeds")
  parser.add_argument("--first-seed", type=int, default=0)
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--stage-epochs", type=int, nargs=3)
  parser.add_argument("--taps-weights", type=float, nargs="+")
  parser.add_argument("--label", help="the outputs' suffix and the title's "
                      "first word (default: quick or full)")
  parser.add_argument("--json", type=Path)
  parser.add_argument("--plot", type=Path)
  args = parser.parse_args(argv)
  config = FULL if args.full else QUICK
  changes = {}
  if args.seeds or args.first_seed:
    count = args.seeds or len(config.seeds)
    changes["seeds"] = tuple(range(args.first_seed, args.first_seed + count))
  if args.epochs:
    changes["epochs"] = args.epochs
  if args.stage_epochs:
    changes["stage_epochs"] = tuple(args.stage_epochs)
  if args.taps_weights:
    changes["taps_weights"] = tuple(args.taps_weights)
  if args.label:
    changes["label"] = args.label
  config = dataclasses.replace(config, **changes)
  report = run_benchmark(config)
  print_table(report)
  write_json(report, args.json or RESULTS / f"budgeted_{config.label}.json")
  plot(report, args.plot or RESULTS / f"budgeted_{config.label}.png")
  return report


if __name__ == "__main__":
  main()
