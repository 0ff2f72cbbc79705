"""The time-to-accuracy summary, the targets, the table and the files."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.finetune.reporting import (
    check_targets, chosen_multirate, curves, format_table, summarise)
from experiments.finetune.tasks.vision import METHODS


def run(seed, seconds, *rows):
  """A run from ``(seconds, validation, test)`` points."""
  points = [{"step": i, "epoch": i, "train_seconds": t,
             "validation_accuracy": v, "test_accuracy": a}
            for i, (t, v, a) in enumerate(rows)]
  return {"seed": seed, "train_seconds": seconds, "steps": len(rows) - 1,
          "epochs": len(rows) - 1, "planned_epochs": len(rows) - 1,
          "points": points}


def result(name, runs, multirate=False, train_all=False):
  return {"name": name, "label": name.replace("_", " "), "rates": {},
          "multirate": multirate, "train_all": train_all, "runs": runs,
          "compile_seconds": 1.0, "share_updated_every_step": 0.5}


RESULTS = [
    result("train_all", [
        run(0, 10.0, (0, .5, .5), (5, .7, .70), (10, .8, .80)),
        run(1, 20.0, (0, .5, .5), (10, .7, .72), (20, .9, .90))],
           train_all=True),
    result("multirate_a", [
        run(0, 10.0, (0, .5, .5), (2, .8, .79), (4, .6, None),
            (10, .85, .83)),
        run(1, 20.0, (0, .5, .5), (4, .75, .80), (20, .85, .86))],
           multirate=True),
    result("multirate_b", [
        run(0, 10.0, (0, .5, .5), (10, .8, .9)),
        run(1, 20.0, (0, .5, .5), (20, .8, .9))], multirate=True),
    result("train_head", [
        run(0, 10.0, (0, .5, .5), (10, .6, .6)),
        run(1, 20.0, (0, .5, .5), (20, .6, .6))]),
]


def test_figures_at_half_and_full_time_and_time_to_target():
  rows = {row["name"]: row for row in summarise(RESULTS)}
  train_all, multirate = rows["train_all"], rows["multirate_a"]
  # At T/2 (5 s and 10 s): train-all's checkpoints at 5 s and 10 s.
  assert train_all["test_at_0.5_mean"] == pytest.approx(71.0)
  assert train_all["test_at_0.5_std"] == pytest.approx(np.std([70, 72],
                                                              ddof=1))
  assert train_all["test_at_1_mean"] == pytest.approx(85.0)
  # Multirate at T/2: seed 0 keeps its 2 s checkpoint (4 s is worse on
  # validation, though untested); seed 1 its 4 s one.
  assert multirate["test_at_0.5_mean"] == pytest.approx(79.5)
  assert multirate["test_at_1_mean"] == pytest.approx(84.5)
  seed0, seed1 = multirate["per_seed"]
  # Targets: train-all's accuracy at T minus 0.5 points, per seed.
  assert seed0["target_accuracy"] == pytest.approx(.795)
  assert seed0["time_to_target_seconds"] == 10.0
  assert seed0["time_to_target_vs_train_all"] == pytest.approx(1.0)
  assert seed1["target_accuracy"] == pytest.approx(.895)
  assert seed1["time_to_target_seconds"] is None  # not reached
  assert multirate["target_reached"] == 1
  assert multirate["time_to_target_vs_train_all_mean"] == pytest.approx(1.0)
  assert rows["train_all"]["target_reached"] == 2
  assert rows["train_head"]["target_reached"] == 0


def test_multirate_variant_is_chosen_on_validation_not_test():
  rows = summarise(RESULTS)
  # multirate_b has the better test accuracy, multirate_a the better
  # validation accuracy within T.
  assert chosen_multirate(rows) == "multirate_a"
  # Within T/2 (5 s and 10 s) only multirate_a has left its first point.
  assert chosen_multirate(rows, 0.5) == "multirate_a"
  assert chosen_multirate(rows[:1]) is None
  targets = {t["target"]: t for t in check_targets(rows, "text")}
  assert targets["at T/2, multirate >= every other method"]["met"]
  assert not targets[
      "multirate within 1.0 point of train-all at <= 0.55 T"]["met"]
  assert targets["multirate more accurate than head-only at equal time"][
      "met"]
  assert len(check_targets(rows, "vision")) == 1
  table = format_table(rows, "FULL RUN", check_targets(rows, "text"))
  assert "not reached" in table and "1.00 (1/2)" in table
  assert ("multirate chosen on validation: within 0.5 T: multirate a; "
          "within 0.55 T: multirate a; within 1 T: multirate a") in table
  assert "target MISSED: multirate within 1.0 point" in table


def test_curves_are_means_with_a_band_over_seeds():
  times, by_name = curves(RESULTS, points=5)
  np.testing.assert_allclose(times, [0, 5, 10, 15, 20])
  train_all = by_name["train_all"]
  # Seed 0's run ends at 10 s: beyond it no mean over both seeds.
  np.testing.assert_allclose(train_all["mean"][:3], [50, 60, 76])
  np.testing.assert_allclose(train_all["low"][:3], [50, 50, 72])
  np.testing.assert_allclose(train_all["high"][:3], [50, 70, 80])
  assert np.isnan(train_all["mean"][3:]).all()


def test_outputs_table_json_and_plot(tiny_run):
  settings, report, _, (json_path, png_path), _ = tiny_run
  assert Path(json_path).name == "finetune_vision.json"
  saved = json.loads(Path(json_path).read_text())
  assert [row["name"] for row in saved["summary"]] == [
      method.name for method in METHODS]
  for row in saved["summary"]:
    assert 0 <= row["test_at_1_mean"] <= 100
    assert 0 <= row["test_at_0.5_mean"] <= 100
    assert row["step_seconds_mean"] > 0
    assert row["per_seed"][0]["budget_seconds"] > 0
  assert saved["summary"][0]["target_reached"] == 1  # train-all itself
  assert saved["settings"]["quick"] is True and saved["task"] == "vision"
  assert saved["targets"][0]["target"].startswith("at T/2")
  assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = format_table(report["summary"], report["description"],
                       report["targets"])
  assert table.startswith("QUICK RUN (reduced")
  assert "vision: EfficientNet-Lite0 on digits" in table
  for method in METHODS:
    assert method.label in table
