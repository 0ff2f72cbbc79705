"""The whole experiment: every method of a task on one data set, in one report.

Train-all runs first: its training time on each seed is every other method's
budget on that seed (:mod:`experiments.finetune.budget`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import tqdm

from experiments.data import Splits
from experiments.finetune.reporting import (
    check_targets, describe, machine, summarise)
from experiments.finetune.selection import run_method, runs_of
from experiments.finetune.settings import Method, Settings
from experiments.finetune.tasks import Task
from experiments.finetune.training import Clock

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def run_experiment(
    task: Task,
    settings: Settings,
    splits: Optional[Splits] = None,
    methods: Optional[Sequence[Method]] = None,
    pretrained: Any = None,
    data_name: Optional[str] = None,
    clock: Optional[Clock] = None,
    test_budget_only: bool = False,
    on_method: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
  """Runs every method; returns settings, machine, per-method results and summary.

  Args:
    task: the task.
    settings: the run's settings.
    splits: the data; default the task's (:attr:`Task.load_splits`).
    methods: the methods to compare; default those ``settings`` names. If
      train-all is among them it runs first and sets the budgets; without
      it every method trains ``settings.epochs`` epochs.
    pretrained: the model to fine-tune (its classifier is replaced); default
      the task's.
    data_name: the data's name in the outputs.
    clock: the training clock; default the one ``settings.clock`` names
      (a parameter for the tests).
    test_budget_only: test only the checkpoint each run reports at its own
      budget (the budget sweep), not every best-so-far one; the report then
      has no time-protocol ``summary`` and ``targets`` (``None``).
    on_method: called after each method with the report so far (the
      methods done, no ``summary`` nor ``targets``), e.g. to save partial
      results of a long run.
  """
  if clock is None:
    clock = CLOCKS[settings.clock]
  if splits is None:
    splits = task.load_splits(settings, None)
  if pretrained is None:
    pretrained = task.load_pretrained()
  data_name = task.data_name if data_name is None else data_name
  if methods is None:
    methods = task.methods_in(settings)
  methods = sorted(methods, key=lambda m: not m.train_all)  # Stable.
  machine_before = machine()
  start = time.perf_counter()
  results, budgets = [], None
  report = functools.partial(_report, task, settings, splits, data_name,
                             machine_before, start)
  with tqdm.tqdm(total=sum(runs_of(m, settings) for m in methods),
                 unit="run", desc=f"fine-tuning ({task.name})",
                 dynamic_ncols=True) as progress:
    for method in methods:
      result = run_method(task, method, pretrained, splits, settings,
                          None if method.train_all else budgets, progress,
                          clock, test_budget_only=test_budget_only)
      if method.train_all:
        budgets = {run["seed"]: run["train_seconds"] for run in result["runs"]}
      results.append(result)
      if on_method is not None:
        on_method(report(results, None, None))
  # The time protocol's summary reads every run at earlier budgets: none
  # with only each run's own budget tested.
  summary = None if test_budget_only else summarise(results)
  return report(results, summary, None if summary is None else
                check_targets(summary, task.name))


def _report(task: Task, settings: Settings, splits: Splits, data_name: str,
            machine_before: dict[str, Any], start: float,
            results: list[dict[str, Any]], summary: Optional[Any],
            targets: Optional[Any]) -> dict[str, Any]:
  """:func:`run_experiment`'s report of ``results``."""
  return {
      "task": task.name,
      "settings": dataclasses.asdict(settings),
      "description": describe(task, settings, data_name),
      "model": task.model_name,
      "data": data_name,
      "machine_at_start": machine_before,
      "load_average_at_end": os.getloadavg(),
      "wall_seconds": time.perf_counter() - start,
      "split_sizes": {name: len(getattr(splits, name).labels)
                      for name in Splits._fields},
      "methods": list(results),
      "summary": summary,
      "targets": targets,
  }
