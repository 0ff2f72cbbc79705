"""A fair recipe for every method at every budget, chosen on validation.

In the plain budget sweep (:mod:`experiments.finetune.sweep`) each method
keeps one recipe at every budget: the rates the time protocol selected for a
run of ``T``. A method whose rates suit ``T`` may be undertrained at ``T/8``.
Here each *family* (train-all, multirate, a baseline) has a grid of
candidate recipes, **of the same size for every family**
(:func:`check_equal_sizes`); a recipe is one of the task's methods with
one point of rates, so a multirate family's grid spans its rates and its
structure (the fast set, drift, k). For each budget fraction ``f``:

1. every candidate of the family, planned for ``f T``, trains on the first
   seed; its score is the validation accuracy of the checkpoint chosen on
   validation within ``f T`` (:func:`experiments.finetune.budget.at_budget`);
2. the candidate with the best score wins (the first on ties,
   :func:`choose_recipe`); only its run is tested, the others never see the
   test split;
3. the winner trains the other seeds; the family's accuracy at ``f`` is its
   test accuracy over all seeds, as in the plain sweep.

Train-all's family at ``f = 1`` runs first, unbudgeted (its planned epochs):
its winner's training time on each seed is ``T`` for every other run there.

Grids are a task's ``recipes`` (:attr:`experiments.finetune.tasks.Task.recipes`):
``{family: ((method name, {rate: values}), ...)}``, each member's rates a
product grid, a family's size the sum of its members' products.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import tqdm

from experiments.data import Splits
from experiments.finetune.budget import at_budget
from experiments.finetune.experiment import CLOCKS
from experiments.finetune.reporting import describe, machine
from experiments.finetune.selection import (
    format_rates, rate_candidates, run_method)
from experiments.finetune.settings import Method, Settings
from experiments.finetune.sweep import FRACTIONS, variant_name
from experiments.finetune.tasks import Task
from experiments.finetune.training import Clock

Member = tuple[str, Mapping[str, Sequence[float]]]
RecipeGrids = Mapping[str, Sequence[Member]]


def family_size(members: Sequence[Member]) -> int:
  """Candidate recipes in a family: its members' rate products, summed.

  Example:
    >>> family_size([("a", {"lr": (1, 2)}), ("b", {"f": (1, 2), "s": (3,)})])
    4
  """
  return sum(len(rate_candidates(grid)) for _, grid in members)


def check_equal_sizes(grids: RecipeGrids) -> int:
  """The common size of every family's grid.

  Raises:
    ValueError: the families' grids differ in size (a larger grid would
      give its family more chances on validation), naming each size.

  Example:
    >>> check_equal_sizes({"x": [("a", {"lr": (1, 2)})],
    ...                    "y": [("b", {"lr": (1,)}), ("c", {"lr": (3,)})]})
    2
  """
  sizes = {family: family_size(members) for family, members in grids.items()}
  if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
    raise ValueError(
        f"every family's recipe grid must have the same positive size, "
        f"found {sizes}; give each family as many candidate recipes.")
  return next(iter(sizes.values()))


def choose_recipe(candidates: Sequence[Mapping[str, Any]]) -> int:
  """Index of the candidate with the best ``validation_accuracy`` (the first
  on ties). Nothing else of a candidate is read.

  Example:
    >>> choose_recipe([{"validation_accuracy": .8, "test_accuracy": .99},
    ...                {"validation_accuracy": .9, "test_accuracy": .10},
    ...                {"validation_accuracy": .9, "test_accuracy": .50}])
    1
  """
  if not candidates:
    raise ValueError("no candidate recipe to choose from.")
  return max(range(len(candidates)),
             key=lambda i: (candidates[i]["validation_accuracy"], -i))


def family_name(family: str, fraction: float) -> str:
  """The family's name at ``fraction``; train-all at ``T`` keeps its own."""
  if family == "train_all" and fraction == 1:
    return family
  return variant_name(Method(family, family), fraction)


def runs_of_recipes(grids: RecipeGrids, settings: Settings,
                    fractions: Sequence[float]) -> int:
  """Training runs of a recipe sweep: per family and fraction (and train-all
  at ``T`` when 1 is not among the fractions), one per candidate and one per
  further seed.

  Example:
    >>> from experiments.finetune.tasks import VISION
    >>> runs_of_recipes(VISION.recipes, VISION.full, (0.5, 1))  # 4 x 2 x (4 + 2)
    48
  """
  size = check_equal_sizes(grids)
  budgets = len(grids) * len(fractions) + (1 not in fractions)
  return budgets * (size + len(settings.seeds) - 1)


def run_recipe_sweep(
    task: Task,
    settings: Settings,
    grids: Optional[RecipeGrids] = None,
    fractions: Sequence[float] = FRACTIONS,
    splits: Optional[Splits] = None,
    pretrained: Any = None,
    clock: Optional[Clock] = None,
) -> dict[str, Any]:
  """Every family at every fraction with its recipe chosen on validation.

  Args:
    task: the task.
    settings: the run's settings (its ``grids`` and ``methods`` are ignored:
      ``grids`` gives the candidates).
    grids: the families' recipe grids (default the task's ``recipes``); one
      family must be ``'train_all'``, with plain train-all members.
    fractions: the budgets, as fractions of ``T``. Train-all runs at ``T``
      (first: its time is ``T``) whether or not 1 is among them; the other
      families only at these.
    splits, pretrained, clock: as for
      :func:`experiments.finetune.experiment.run_experiment`.

  Returns:
    A report shaped as :func:`~experiments.finetune.experiment.run_experiment`'s
    (so :func:`experiments.finetune.sweep.sweep_report` reads it): one
    result per family and fraction, named ``family@f``, whose ``recipe``
    names the winning method and rates and whose ``candidates`` hold every
    candidate's validation score.
  """
  grids = task.recipes if grids is None else grids
  check_equal_sizes(grids)
  if "train_all" not in grids:
    raise ValueError(f"the recipe grids need a 'train_all' family (its time "
                     f"is T); found {sorted(grids)}.")
  for member, _ in grids["train_all"]:
    if not task.method(member).train_all:
      raise ValueError(f"the train_all family's member {member!r} is not "
                       "plain train-all; its time cannot be T.")
  clock = CLOCKS[settings.clock] if clock is None else clock
  splits = task.load_splits(settings, None) if splits is None else splits
  pretrained = task.load_pretrained() if pretrained is None else pretrained
  order = [("train_all", 1)] + [
      (family, fraction) for family in grids for fraction in fractions
      if (family, fraction) != ("train_all", 1)]
  machine_before = machine()
  start = time.perf_counter()
  results, budgets = [], None
  with tqdm.tqdm(total=runs_of_recipes(grids, settings, fractions),
                 unit="run", desc=f"recipe sweep ({task.name})",
                 dynamic_ncols=True) as progress:
    for family, fraction in order:
      result = _run_family(task, family, grids[family], fraction, pretrained,
                           splits, settings, budgets, progress, clock)
      if budgets is None:
        budgets = {run["seed"]: run["train_seconds"] for run in result["runs"]}
      results.append(result)
  return {
      "task": task.name,
      "settings": dataclasses.asdict(settings),
      "description": describe(task, settings, task.data_name),
      "model": task.model_name, "data": task.data_name,
      "machine_at_start": machine_before,
      "load_average_at_end": os.getloadavg(),
      "wall_seconds": time.perf_counter() - start,
      "split_sizes": {name: len(getattr(splits, name).labels)
                      for name in Splits._fields},
      "recipe_grids": {family: [[name, dict(grid)] for name, grid in members]
                       for family, members in grids.items()},
      "methods": results,
  }


def _run_family(task: Task, family: str, members: Sequence[Member],
                fraction: float, pretrained: Any, splits: Splits,
                settings: Settings, budgets: Optional[Mapping[int, float]],
                progress: tqdm.tqdm, clock: Clock) -> dict[str, Any]:
  """One family at one fraction: its candidates on the first seed, the
  winner tested and trained on the other seeds."""
  first, others = settings.seeds[0], settings.seeds[1:]
  budget = math.inf if budgets is None else fraction * budgets[first]
  candidates, pending = [], []
  for member, grid in members:
    method = task.method(member)
    variant = dataclasses.replace(
        method, budget_fraction=fraction,
        name=(member if method.train_all and fraction == 1
              else variant_name(method, fraction)))
    result = run_method(
        task, variant, pretrained, splits,
        dataclasses.replace(settings, seeds=(first,),
                            grids={variant.name: grid}),
        budgets, progress, clock, test=False, test_budget_only=True)
    chosen = at_budget(result["runs"][0]["points"], budget)
    # The run kept is the member's best rates on validation; the others'
    # scores come from the member's own selection.
    scores = result["selection"] or [
        {"rates": result["rates"],
         "validation_accuracy": chosen["validation_accuracy"]}]
    for score in scores:
      candidates.append({"method": member, **score})
    pending.append((method, variant, result, chosen["validation_accuracy"]))
  best = choose_recipe([{"validation_accuracy": v} for *_, v in pending])
  method, variant, result, _ = pending[best]
  first_run = result.pop("test_later")()  # Only the winner meets the test.
  for _, _, other, _ in pending:
    other.pop("test_later", None)  # Frees the losers' checkpoints.
  runs = list(first_run)
  if others:
    rest = run_method(
        task, variant, pretrained, splits,
        dataclasses.replace(settings, seeds=others, grids={
            variant.name: {k: (v,) for k, v in result["rates"].items()}}),
        budgets, progress, clock, test_budget_only=True)
    runs += rest["runs"]
  name = family_name(family, fraction)
  return {
      "name": name, "family": family,
      "label": f"{family} (best of {len(candidates)} recipes), planned for "
               f"{fraction:g} T",
      "multirate": method.multirate,
      "train_all": family == "train_all" and fraction == 1,
      "rates": result["rates"],
      "recipe": {"method": method.name, "label": method.label,
                 "rates": result["rates"],
                 "short": f"{method.name} {format_rates(result['rates'])}"},
      "candidates": candidates, "selection": result["selection"],
      "runs": runs, "compile_seconds": result["compile_seconds"],
      "probe_step_seconds": result["probe_step_seconds"],
      "share_updated_every_step": result["share_updated_every_step"],
  }
