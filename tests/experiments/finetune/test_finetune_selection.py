"""Learning-rate selection on validation, and the seeds' runs."""

from experiments.finetune.selection import (
    rate_candidates, runs_of, select_rates)
from experiments.finetune.settings import METHODS


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


def test_selection_uses_validation_and_never_test(tiny_run, tiny_splits):
  _, report, evaluated, _, _ = tiny_run
  during_selection = [data for selecting, data in evaluated if selecting]
  assert len(during_selection) == 2  # train_classifier's two candidates
  assert all(data is tiny_splits.validation for data in during_selection)
  afterwards = [data for selecting, data in evaluated if not selecting]
  assert len(afterwards) == len(METHODS)  # one seed each, on test
  assert all(data is tiny_splits.test for data in afterwards)
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
