"""Learning-rate selection on validation, the seeds' runs, and the test split
kept out of every choice."""

from experiments.finetune.budget import improvements
from experiments.finetune.selection import (
    rate_candidates, runs_of, select_rates)
from experiments.finetune.tasks.vision import METHODS


def test_rate_candidates_are_the_grid_product():
  assert rate_candidates({"fast_learning_rate": (1, 2),
                          "slow_learning_rate": (3, 4)}) == [
      {"fast_learning_rate": 1, "slow_learning_rate": 3},
      {"fast_learning_rate": 1, "slow_learning_rate": 4},
      {"fast_learning_rate": 2, "slow_learning_rate": 3},
      {"fast_learning_rate": 2, "slow_learning_rate": 4}]


def test_selection_picks_the_best_validation_accuracy_first_on_ties():
  scores = {0.1: 0.5, 0.3: 0.9, 1.0: 0.9, 3.0: 0.2}
  candidates = [{"learning_rate": r} for r in scores]
  rates, scored = select_rates(candidates,
                               lambda r: scores[r["learning_rate"]])
  assert rates == {"learning_rate": 0.3}
  assert [s["validation_accuracy"] for s in scored] == list(scores.values())


def test_a_single_candidate_is_not_trained():
  def never(rates):
    raise AssertionError("evaluated")
  assert select_rates([{"learning_rate": 0.1}], never) == (
      {"learning_rate": 0.1}, [])


def test_runs_see_validation_only_and_test_comes_after(tiny_run, tiny_splits):
  """Spy on every evaluation: inside rate selection and inside training runs
  only the validation split is evaluated; the test split only afterwards, and
  only on the checkpoints a budget can report (best so far on validation)."""
  _, report, evaluated, _, _ = tiny_run
  during = [data for phase, data in evaluated if phase != "after"]
  assert during and all(data is tiny_splits.validation for data in during)
  afterwards = [data for phase, data in evaluated if phase == "after"]
  assert all(data is tiny_splits.test for data in afterwards)
  tested = [point for method in report["methods"] for run in method["runs"]
            for point in run["points"] if point["test_accuracy"] is not None]
  assert len(afterwards) == len(tested)
  for method in report["methods"]:
    for run in method["runs"]:
      best = improvements(run["points"])
      assert [i for i, p in enumerate(run["points"])
              if p["test_accuracy"] is not None] == best
  selection = {m["name"]: m["selection"] for m in report["methods"]}
  assert [s["rates"] for s in selection["train_classifier"]] == [
      {"learning_rate": 0.01}, {"learning_rate": 0.1}]
  assert all(not s for name, s in selection.items()
             if name != "train_classifier")


def test_the_selected_run_of_the_first_seed_is_reused(tiny_run):
  settings, _, _, _, trained = tiny_run
  # One run per method, two for the one with two grid points: the selected
  # one is its seed-0 result, not trained again.
  assert trained == [0] * (len(METHODS) + 1)
  assert sum(runs_of(m, settings) for m in METHODS) == len(trained)


def test_every_method_but_train_all_runs_on_train_all_s_time(tiny_run):
  _, report, _, _, _ = tiny_run
  train_all, *others = report["methods"]
  assert train_all["name"] == "train_all"
  budget = train_all["runs"][0]["train_seconds"]
  assert train_all["runs"][0]["budget_seconds"] is None
  for method in others:
    run, = method["runs"]
    assert run["budget_seconds"] == budget
    # It stops at its plan's end or at the first point past the budget.
    within = [p for p in run["points"] if p["train_seconds"] < budget]
    assert len(run["points"]) - len(within) <= 1
