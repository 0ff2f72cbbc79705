"""Each method's learning rates, selected on validation, and its seeds' runs.

Every method's rate(s) are picked from a small fixed grid by validation
accuracy: one training run per grid point with the first seed, scored by the
validation accuracy of the checkpoint its budget allows
(:func:`experiments.finetune.budget.chosen_index`); that seed's run with the
selected rates is then its reported one. Runs never see the test split: the
checkpoints a budget can report are kept during training and tested only
after selection, and only those of the reported runs.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import tqdm

from experiments.data import Splits
from experiments.finetune.budget import (
    chosen_index, evaluation_interval, pack_correct, planned_steps, step_cap)
from experiments.finetune.settings import (
    Method, Rates, Settings, share_updated_every_step)
from experiments.finetune.tasks import Task
from experiments.finetune.training import (
    Clock, Plan, Run, correct, make_step, train_and_evaluate, train_buckets,
    warm_up)

PyTree = Any


def rate_candidates(grid: Mapping[str, Sequence[float]]) -> list[Rates]:
  """Every combination of the grid's values, first axis slowest."""
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(
      *(grid[name] for name in names))]


def select_rates(
    candidates: Sequence[Rates], validation_accuracy: Callable[[Rates], float],
) -> tuple[Rates, list[dict[str, Any]]]:
  """The candidate with the best validation accuracy (the first on ties).

  A single candidate is returned without being evaluated.

  Returns:
    The chosen rates, and each candidate's ``{'rates', 'validation_accuracy'}``
    (empty with a single candidate).

  Example:
    >>> select_rates([{'lr': 0.1}, {'lr': 0.3}], lambda r: 1 - abs(r['lr'] - 0.3))
    ({'lr': 0.3}, [{'rates': {'lr': 0.1}, 'validation_accuracy': 0.8}, {'rates': {'lr': 0.3}, 'validation_accuracy': 1.0}])
  """
  if len(candidates) == 1:
    return dict(candidates[0]), []
  scored = [{"rates": dict(rates), "validation_accuracy": validation_accuracy(rates)}
            for rates in candidates]
  best = max(range(len(scored)),
             key=lambda i: (scored[i]["validation_accuracy"], -i))
  return dict(candidates[best]), scored


def format_rates(rates: Rates) -> str:
  """``rates`` in a few characters (``h_F=0.003 h_S=0.005``), for tables,
  progress and the keys of the first seed's runs."""
  short = {"learning_rate": "h", "fast_learning_rate": "h_F",
           "slow_learning_rate": "h_S", "encoder_learning_rate": "h_enc",
           "head_learning_rate": "h_head"}
  return " ".join(f"{short.get(k, k)}={v:g}" for k, v in rates.items())


@functools.lru_cache(maxsize=16)
def _cached_predict(make_predict: Callable[[Any], Any], model: Any) -> Any:
  return make_predict(model)


def shared_predict(task: Task, model: Any) -> Callable[[PyTree, Any], Any]:
  """The task's jitted ``predict`` for ``model``, one per equal model.

  Every method fine-tunes the same network (Flax modules compare and hash by
  their fields), so one compiled inference program serves every method's
  validation and test passes instead of one compilation per method. A model
  that cannot be hashed gets its own.

  Example:
    >>> import types
    >>> task = types.SimpleNamespace(make_predict=lambda model: object())
    >>> shared_predict(task, ("net", 10)) is shared_predict(task, ("net", 10))
    True
    >>> shared_predict(task, ["unhashable"]) is shared_predict(task, ["unhashable"])
    False
  """
  try:
    hash(model)
  except TypeError:
    return task.make_predict(model)
  return _cached_predict(task.make_predict, model)


def runs_of(method: Method, settings: Settings) -> int:
  """Training runs of a method: one per grid point, one per further seed."""
  candidates = len(rate_candidates(settings.grids[method.name]))
  return candidates + len(settings.seeds) - 1


def probe_steps(method: Method, settings: Settings) -> int:
  """Steps timed after compilation to plan a budgeted run: whole multirate
  cycles (one), or three plain steps."""
  return method.period_in(settings) if method.timetabled else 3


def run_method(task: Task, method: Method, pretrained: Any, splits: Splits,
               settings: Settings, budgets: Optional[Mapping[int, float]],
               progress: tqdm.tqdm,
               clock: Clock = time.perf_counter,
               test: bool = True,
               test_budget_only: bool = False) -> dict[str, Any]:
  """Selects the method's rates on validation, then trains and tests each seed.

  Args:
    task: the task.
    method: one of its methods.
    pretrained: the task's pretrained model.
    splits: the data.
    settings: the run's settings.
    budgets: train-all's training seconds on each seed; the method is
      allowed ``method.budget_fraction`` of them. ``None`` for train-all itself, or to run every method for
      ``settings.epochs``.
    progress: advanced by one per training run.
    clock: the training clock (a parameter for the tests).
    test: ``False`` defers the test split: the runs come back untested (every
      ``test_accuracy`` ``None``) and the result holds ``'test_later'``, a
      function that tests them and returns the tested runs. A caller that
      chooses among several methods on validation
      (:mod:`experiments.finetune.recipes`) tests only the chosen one.
    test_budget_only: test only the checkpoint each run reports at its own
      budget (the budget sweep reads nothing else), not every best-so-far
      one (which the time protocol reads at earlier budgets).

  Returns:
    Name, label, selected rates, the selection's scores, compile and probe
    seconds, share of parameters updated every step, and one entry per seed:
    its plan, its evaluation points (test accuracy on the best-so-far ones)
    and its training seconds.
  """
  first_seed = settings.seeds[0]
  model, variables = task.fresh_variables(pretrained, first_seed,
                                          splits.num_classes)
  share = share_updated_every_step(method, variables["params"])
  steps_per_epoch = len(splits.train.labels) // settings.batch_size
  epoch_steps = max(1, round(settings.epochs * steps_per_epoch))
  optimizer = lambda rates, steps: task.make_optimizer(method, rates,
                                                       settings, steps)
  candidates = rate_candidates(settings.grids[method.name])
  step = make_step(method, task.make_loss(model, settings),
                   optimizer(candidates[0], epoch_steps), variables["params"])
  predict = shared_predict(task, model)
  eval_batch_size = 4 * settings.batch_size
  # Token inputs: evaluation batches at every bucket, train batches at the
  # buckets their seeds' batches need; every train program compiled here.
  eval_buckets = task.length_buckets(settings)
  buckets = None if eval_buckets is None else train_buckets(
      eval_buckets, splits.train, settings.batch_size, settings.seeds,
      step_cap(epoch_steps, settings.max_epochs_factor))
  progress.set_postfix_str(f"{method.name}: compiling")
  compile_seconds, step_seconds = warm_up(
      step, method, optimizer(candidates[0], epoch_steps), variables,
      splits.train, settings.batch_size,
      probe_steps=0 if budgets is None else probe_steps(method, settings),
      clock=clock, buckets=buckets)

  def plan(seed: int) -> Plan:
    budget = (None if budgets is None
              else budgets[seed] * method.budget_fraction)
    steps = planned_steps(budget, step_seconds, epoch_steps,
                          settings.max_epochs_factor)
    if budget is None:  # No train-all to time: the share of its epochs.
      steps = max(1, round(steps * method.budget_fraction))
    return Plan(steps, evaluation_interval(steps, settings.evaluations),
                budget, step_cap(epoch_steps, settings.max_epochs_factor))

  def validate(trained: PyTree) -> float:
    return float(np.mean(correct(predict, trained, splits.validation,
                                 eval_batch_size, buckets=eval_buckets)))

  def train(rates: Rates, seed: int) -> tuple[Plan, Run]:
    seed_plan = plan(seed)
    run = train_and_evaluate(
        step, method, optimizer(rates, seed_plan.steps),
        task.fresh_variables(pretrained, seed, splits.num_classes)[1],
        splits.train, seed_plan, settings.batch_size, seed, validate, clock,
        buckets)
    progress.update(1)
    return seed_plan, run

  first_runs = {}  # The first seed's run of each grid point, by its rates.

  def validation_accuracy(rates: Rates) -> float:
    progress.set_postfix_str(f"{method.name}: selecting {format_rates(rates)}")
    seed_plan, run = first_runs[format_rates(rates)] = train(rates, first_seed)
    budget = math.inf if seed_plan.budget is None else seed_plan.budget
    return run.points[chosen_index(run.points, budget)]["validation_accuracy"]

  rates, selection = select_rates(candidates, validation_accuracy)
  trained_runs = []
  for seed in settings.seeds:
    progress.set_postfix_str(f"{method.name}: seed {seed}")
    if seed == first_seed and format_rates(rates) in first_runs:
      seed_plan, run = first_runs.pop(format_rates(rates))
    else:
      seed_plan, run = train(rates, seed)
    first_runs.clear()  # Frees the other grid points' checkpoints.
    trained_runs.append((seed, seed_plan, run))

  def test_runs(test_split: bool = True) -> list[dict[str, Any]]:
    score = (lambda trained: correct(
        predict, trained, splits.test, eval_batch_size,
        buckets=eval_buckets)) if test_split else None
    return [run_record(run, seed, seed_plan, steps_per_epoch, score,
                       test_budget_only)
            for seed, seed_plan, run in trained_runs]

  result = {
      "name": method.name, "label": method.label,
      "multirate": method.multirate, "train_all": method.train_all,
      "rates": rates, "selection": selection,
      "runs": test_runs(test_split=test),
      "compile_seconds": compile_seconds, "probe_step_seconds": step_seconds,
      "train_bucket_lengths": None if buckets is None else buckets.lengths,
      "share_updated_every_step": share,
  }
  if test:
    trained_runs.clear()
  else:
    result["test_later"] = test_runs
  return result


def run_record(run: Run, seed: int, plan: Plan, steps_per_epoch: int,
               test: Optional[Callable[[PyTree], np.ndarray]],
               budget_only: bool = False) -> dict[str, Any]:
  """A finished run's record, its kept checkpoints tested.

  Only the best-so-far checkpoints are kept by the run, so only they get a
  test accuracy and ``test_correct`` (``test`` gives the per-example hits,
  :func:`experiments.finetune.budget.pack_correct`); the others' are ``None``
  (every one's, with ``test`` ``None``: not tested yet). With ``budget_only``, only the checkpoint
  chosen at the plan's budget (:func:`chosen_index`; the run's end without
  a budget) is tested: all a run read at its own budget needs.
  """
  points = [dict(point, test_accuracy=None) for point in run.points]
  indices = set(run.checkpoints)
  if budget_only:
    indices = {chosen_index(run.points, math.inf if plan.budget is None
                            else plan.budget)}
  if test is not None:
    for index in sorted(indices):
      hits = test(run.checkpoints[index])
      points[index]["test_accuracy"] = float(np.mean(hits))
      points[index]["test_correct"] = pack_correct(hits)
  steps = points[-1]["step"] if points else plan.steps
  return {"seed": seed, "planned_steps": plan.steps,
          "planned_epochs": plan.steps / steps_per_epoch,
          "evaluate_every": plan.evaluate_every,
          "budget_seconds": plan.budget, "steps": steps,
          "epochs": steps / steps_per_epoch,
          "train_seconds": run.train_seconds, "points": points}
