"""The budget sweep: runs planned for each budget, intervals, verdicts."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments.finetune.experiment import run_experiment
from experiments.finetune.sweep import (
    budget_variants, difference, format_sweep, interval, sweep_report,
    verdict)
from experiments.finetune.tasks import VISION


@pytest.fixture(scope="module")
def tiny_sweep(tiny_pretrained, tiny_splits, tiny_settings):
  settings = tiny_settings(VISION, methods=("train_all", "multirate_classifier",
                                            "train_classifier"))
  methods, settings = budget_variants(VISION.methods_in(settings), settings,
                                      (0.25, 0.5, 1.0))
  # As the benchmark runs it: only each run's own budget tested.
  report = run_experiment(VISION, settings, tiny_splits, methods=methods,
                          pretrained=tiny_pretrained(), test_budget_only=True)
  return report, sweep_report(report)


def test_each_budget_gets_a_run_planned_for_it(tiny_sweep):
  report, _ = tiny_sweep
  runs = {result["name"]: result["runs"][0] for result in report["methods"]}
  budget = runs["train_all"]["train_seconds"]
  for name, run in runs.items():
    fraction = 1.0 if "@" not in name else float(name.rsplit("@", 1)[1])
    if name == "train_all":
      assert run["budget_seconds"] is None
      continue
    assert run["budget_seconds"] == pytest.approx(fraction * budget)
  # How many steps fit is measured (tested with a fake clock in
  # test_finetune_budget.py); the budget each run plans for is f T exactly.


def test_table_reads_each_variant_at_its_own_budget(tiny_sweep):
  report, sweep = tiny_sweep
  table = sweep["table"]
  assert set(table) == {"train_all", "multirate_classifier",
                        "train_classifier"}
  assert all(set(rows) == {"0.25", "0.5", "1"} for rows in table.values())
  test_size = report["split_sizes"]["test"]
  for rows in table.values():
    for row in rows.values():
      assert (row["test_mean"], row["test_half_width"]) == interval(
          row["test"], test_size)
  # One checkpoint tested per run: the one its own budget reports.
  for result in report["methods"]:
    for run in result["runs"]:
      assert sum(p["test_accuracy"] is not None for p in run["points"]) == 1
  assert report["summary"] is None and report["targets"] is None
  assert {t["target"].split(",")[0] for t in sweep["targets"]} == {
      "at T/2", "at T/4"}
  assert "B = 0.25 T" in format_sweep(table, sweep["targets"])


def test_interval_combines_seeds_and_test_sampling_by_hand():
  accuracies = [0.80, 0.85, 0.83, 0.86]
  values = 100 * np.array(accuracies)
  seed = stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2
  p = values.mean() / 100
  test = 1.959964 * 100 * math.sqrt(p * (1 - p) / 500)
  mean, half = interval(accuracies, 500)
  assert mean == pytest.approx(83.5)
  assert half == pytest.approx(math.sqrt(seed ** 2 + test ** 2), rel=1e-6)


def test_difference_is_paired_by_seed():
  # A constant per-seed lead has no seed spread: only the test term is left.
  first, second = [0.9, 0.8, 0.7], [0.89, 0.79, 0.69]
  mean, half = difference(first, second, 10 ** 6)
  assert mean == pytest.approx(1.0)
  assert half < 0.2
  with pytest.raises(ValueError, match="paired by seed"):
    difference([0.9], [0.9, 0.8], 100)


def test_verdicts_use_the_interval():
  assert verdict(0.6, 0.5, 0.0) == "met"
  assert verdict(-0.6, 0.5, 0.0) == "missed"
  assert verdict(0.4, 0.5, 0.0) == "not resolved"
  assert verdict(-0.2, 0.2, -0.5) == "met"


def test_bad_fractions_are_refused():
  with pytest.raises(ValueError, match="fractions"):
    budget_variants(VISION.methods, VISION.quick, (0.0, 1.0))
