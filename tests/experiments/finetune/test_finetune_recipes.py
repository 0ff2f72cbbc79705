"""The recipe sweep: grids of one size per family, chosen on validation at
each budget, only the winner tested."""

import pytest

from experiments.finetune import selection
from experiments.finetune.recipes import (
    check_equal_sizes, choose_recipe, run_recipe_sweep, runs_of_recipes)
from experiments.finetune.sweep import format_recipes, sweep_report
from experiments.finetune.tasks import TEXT, VISION

_F, _S = "fast_learning_rate", "slow_learning_rate"
GRIDS = {
    "train_all": (("train_all", {"learning_rate": (0.01, 0.1)}),),
    "multirate": (
        ("multirate_classifier", {_F: (0.01,), _S: (0.01,)}),
        ("multirate_last_stage", {_F: (0.05,), _S: (0.02,)}),
    ),
    "train_classifier": (("train_classifier", {"learning_rate": (0.01, 0.1)}),),
}
FRACTIONS = (0.5, 1.0)


@pytest.fixture(scope="module")
def recipe_sweep(tiny_pretrained, tiny_splits, tiny_settings):
  """The sweep, with every accuracy evaluation and training run recorded."""
  settings = tiny_settings(VISION, image_size=8, seeds=(0, 1))
  evaluated, trained = [], []
  real_correct, real_train = selection.correct, selection.train_and_evaluate

  def spy_correct(predict, variables, data, batch_size, **kwargs):
    evaluated.append(data)
    return real_correct(predict, variables, data, batch_size, **kwargs)

  def spy_train(*args):
    trained.append(args[7])  # the seed
    return real_train(*args)

  monkeypatch = pytest.MonkeyPatch()
  monkeypatch.setattr(selection, "correct", spy_correct)
  monkeypatch.setattr(selection, "train_and_evaluate", spy_train)
  try:
    report = run_recipe_sweep(VISION, settings, GRIDS, FRACTIONS, tiny_splits,
                              pretrained=tiny_pretrained())
  finally:
    monkeypatch.undo()
  return settings, report, evaluated, trained


def by_hand_validation(points, budget):
  """The best validation accuracy among the points within ``budget``."""
  return max(p["validation_accuracy"] for p in points
             if p["train_seconds"] <= budget * (1 + 1e-9))


def test_every_family_gets_as_many_candidates_at_every_budget(recipe_sweep):
  settings, report, _, trained = recipe_sweep
  names = [r["name"] for r in report["methods"]]
  assert names[0] == "train_all"  # Sets T first.
  assert sorted(names) == sorted(
      ["train_all", "train_all@0.5", "multirate@0.5", "multirate@1",
       "train_classifier@0.5", "train_classifier@1"])
  for result in report["methods"]:
    assert len(result["candidates"]) == 2
    assert [r["seed"] for r in result["runs"]] == [0, 1]
  # One run per candidate, one per further seed: nothing trained twice.
  assert len(trained) == runs_of_recipes(GRIDS, settings, FRACTIONS) == 18
  assert trained.count(1) == 6


def test_the_winner_is_the_best_on_validation_within_its_budget(recipe_sweep):
  _, report, _, _ = recipe_sweep
  results = {r["name"]: r for r in report["methods"]}
  budget_t = results["train_all"]["runs"][0]["train_seconds"]
  for result in report["methods"]:
    fraction = 1.0 if "@" not in result["name"] else float(
        result["name"].split("@")[1])
    scores = [c["validation_accuracy"] for c in result["candidates"]]
    best = scores.index(max(scores))  # The first of the best.
    winner = result["candidates"][best]
    assert (result["recipe"]["method"], result["recipe"]["rates"]) == (
        winner["method"], winner["rates"])
    budget = float("inf") if result["train_all"] else fraction * budget_t
    assert winner["validation_accuracy"] == by_hand_validation(
        result["runs"][0]["points"], budget)
    # The other seed trains the winner's recipe, planned for the same f T.
    if not result["train_all"]:
      assert all(run["budget_seconds"] == pytest.approx(
          fraction * run_t["train_seconds"])
          for run, run_t in zip(result["runs"], results["train_all"]["runs"]))


def test_only_the_winners_meet_the_test_split(recipe_sweep, tiny_splits):
  _, report, evaluated, _ = recipe_sweep
  test_evaluations = sum(data is tiny_splits.test for data in evaluated)
  tested = sum(p["test_accuracy"] is not None for r in report["methods"]
               for run in r["runs"] for p in run["points"])
  assert test_evaluations == tested > 0
  for result in report["methods"]:
    assert all("test" not in key for c in result["candidates"] for key in c)


def test_the_sweep_table_reads_the_recipe_sweep(recipe_sweep):
  _, report, _, _ = recipe_sweep
  sweep = sweep_report(report)
  assert set(sweep["table"]) == set(GRIDS)
  assert all(set(rows) == {"0.5", "1"} for rows in sweep["table"].values())
  assert [t["multirate"] for t in sweep["targets"]] == ["multirate"] * 2
  text = format_recipes(sweep["table"])
  assert len(text.splitlines()) == 6 and "multirate at 0.5 T: " in text


def test_without_t_among_the_fractions_only_train_all_runs_at_t(
    tiny_pretrained, tiny_splits, tiny_settings):
  settings = tiny_settings(VISION, image_size=8, seeds=(0,))
  report = run_recipe_sweep(VISION, settings, GRIDS, (0.25,), tiny_splits,
                            pretrained=tiny_pretrained())
  names = [r["name"] for r in report["methods"]]
  assert names == ["train_all", "train_all@0.25", "multirate@0.25",
                   "train_classifier@0.25"]
  # T, then each family at T/4: 2 candidates each, no further seed.
  assert runs_of_recipes(GRIDS, settings, (0.25,)) == 8
  assert sum(len(r["candidates"]) for r in report["methods"]) == 8
  targets = sweep_report(report)["targets"]
  assert [t["against"] for t in targets] == ["train_all", "train_classifier"]


def test_choose_recipe_reads_validation_only():
  candidates = [{"validation_accuracy": 0.7, "test_accuracy": 1.0},
                {"validation_accuracy": 0.9, "test_accuracy": 0.0}]
  assert choose_recipe(candidates) == 1
  with pytest.raises(ValueError, match="no candidate"):
    choose_recipe([])


def test_grids_of_unequal_size_are_refused(tiny_settings):
  unequal = {**GRIDS, "train_classifier": (
      ("train_classifier", {"learning_rate": (0.01, 0.1, 1.0)}),)}
  with pytest.raises(ValueError, match="same positive size.*'train_classifier': 3"):
    check_equal_sizes(unequal)
  no_baseline = {k: v for k, v in GRIDS.items() if k != "train_all"}
  with pytest.raises(ValueError, match="'train_all' family"):
    run_recipe_sweep(VISION, tiny_settings(VISION), no_baseline, FRACTIONS,
                     splits=object(), pretrained=object())


def test_the_tasks_grids_are_of_equal_size():
  for task in (VISION, TEXT):
    assert check_equal_sizes(task.recipes) == 4
    for members in task.recipes.values():
      for name, grid in members:
        assert set(grid) == set(task.method(name).rate_names)
