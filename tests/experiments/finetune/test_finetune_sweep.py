"""The budget sweep: runs planned for each budget, intervals, verdicts."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments.finetune.budget import pack_correct, unpack_correct
from experiments.finetune.experiment import run_experiment
from experiments.finetune.sweep import (
    budget_variants, compared, difference, format_sweep, interval,
    sweep_report, verdict)
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
  # Each tested run kept which test examples it got right, and the targets
  # were paired by example with them.
  for rows in table.values():
    for row in rows.values():
      for packed, accuracy in zip(row["test_correct"], row["test"]):
        assert unpack_correct(packed, test_size).mean() == accuracy
  assert {t["pairing"] for t in sweep["targets"]} == {
      "seeds and test examples"}


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


def test_difference_paired_by_example_is_mcnemars_by_hand():
  # One seed: the test term is the sampling error of the mean of the
  # per-example differences, which counts only the discordant examples
  # (b: first right and second wrong, c: the reverse).
  rng = np.random.default_rng(0)
  n = 730
  first = rng.random(n) < 0.75
  second = np.where(rng.random(n) < 0.9, first, ~first)
  b = int(np.sum(first & ~second))
  c = int(np.sum(~first & second))
  d = (b - c) / n
  variance = ((b + c) / n - d ** 2) * n / (n - 1)
  expected = 1.959964 * 100 * math.sqrt(variance / n)
  mean, half = difference([first.mean()], [second.mean()], n,
                          first_correct=[first], second_correct=[second])
  assert mean == pytest.approx(100 * d)
  assert half == pytest.approx(expected, rel=1e-6)
  # Far tighter than adding both binomial terms, for runs that mostly agree.
  assert half < 0.5 * difference([first.mean()], [second.mean()], n)[1]
  with pytest.raises(ValueError, match="per-example records"):
    difference([0.5], [0.5], n + 1, first_correct=[first],
               second_correct=[second])


def test_difference_paired_by_example_covers_the_true_difference():
  # Coverage by simulation, independent of the formula: three seeds of two
  # methods on test splits drawn from one population in which the first is
  # 2 points better; the 95% interval must cover 2 points in about 95% of
  # the draws (paired by example, it would not if it dropped a term).
  rng = np.random.default_rng(1)
  seeds, n, trials, covered = 3, 1000, 400, 0
  for _ in range(trials):
    easy = rng.random(n)  # Each test example's difficulty.
    shift = rng.normal(0, 0.02, seeds)  # Each seed's training luck.
    first = [easy < 0.80 + s + rng.normal(0, 0.03, n) for s in shift]
    second = [easy < 0.78 + s + rng.normal(0, 0.03, n) for s in shift]
    mean, half = difference([f.mean() for f in first],
                            [s.mean() for s in second], n,
                            first_correct=first, second_correct=second)
    covered += abs(mean - 2.0) <= half
  assert 0.92 <= covered / trials <= 0.995


def test_targets_fall_back_to_binomial_terms_without_records():
  cell = {"test": [0.8, 0.82, 0.85], "test_correct": [None] * 3}
  other = {"test": [0.7, 0.75, 0.74], "test_correct": [None] * 3}
  row = compared(cell, other, 270, 0.0, {"target": "t"})
  assert row["pairing"] == "seeds (binomial terms added)"
  assert (row["difference_mean"], row["difference_half_width"]) == difference(
      cell["test"], other["test"], 270)


def test_per_example_records_round_trip_and_refuse_another_split():
  hits = np.random.default_rng(2).random(1000) < 0.7
  assert (unpack_correct(pack_correct(hits), 1000) == hits).all()
  with pytest.raises(ValueError, match="another test split"):
    unpack_correct(pack_correct(hits), 1100)


def test_verdicts_use_the_interval():
  assert verdict(0.6, 0.5, 0.0) == "met"
  assert verdict(-0.6, 0.5, 0.0) == "missed"
  assert verdict(0.4, 0.5, 0.0) == "not resolved"
  assert verdict(-0.2, 0.2, -0.5) == "met"


def test_bad_fractions_are_refused():
  with pytest.raises(ValueError, match="fractions"):
    budget_variants(VISION.methods, VISION.quick, (0.0, 1.0))
