"""benchmarks/growing.py on a tiny network: its report has every method, its
derived columns follow their definitions, and growth keeps the function.

Timings and accuracies are not asserted on (they depend on the machine and
on a few steps of training).
"""

import json

import pytest

from benchmarks import growing

METHODS = ["full_width", "pairing", "+variance", "+lr_layer", "+lr_network",
           "+state", "+state p_c=0.5"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("growing")
  # Widths 2 -> 4 -> 8 (main plan) and 2, 3, 5, 7, 8 (the compared rate), one
  # residual block, two epochs of 19 steps.
  growing.main([
      "--seeds", "1", "--epochs", "2", "--eval-every", "1", "--stream", "8",
      "--hidden", "8", "--blocks", "1", "--width-rate", "1",
      "--compare-width-rate", "0.5", "--grow-fraction", "0.6",
      "--json", str(out / "growing.json"), "--plot", str(out / "growing.png")])
  return json.loads((out / "growing.json").read_text()), out


def test_every_method_is_reported_once_per_seed(report):
  result, out = report
  assert [row["method"] for row in result["summary"]] == METHODS
  assert sorted(r["method"] for r in result["runs"]) == sorted(METHODS)
  assert (out / "growing.png").stat().st_size > 0


def test_derived_columns_follow_their_definitions(report):
  result, _ = report
  rows = {row["method"]: row for row in result["summary"]}
  base = rows["full_width"]
  for name, row in rows.items():
    assert row["time_ratio"] == pytest.approx(
        row["train_seconds_median"] / base["train_seconds_median"])
    assert row["flops_ratio"] == pytest.approx(row["flops"] / base["flops"])
    assert row["accuracy_vs_full_width"] == pytest.approx(
        row["test_accuracy_mean"] - base["test_accuracy_mean"])
    if name != "full_width":
      assert row["flops_ratio"] < 1
  for run in result["runs"]:
    # FLOPs: each stage's program times its steps, summed over the stages.
    assert run["flops"] == pytest.approx(sum(
        s["flops_per_step"] * s["steps"] for s in run["stages"]))
    assert sum(s["steps"] for s in run["stages"]) == (
        result["config"]["total_steps"])
  assert result["targets"]["time_ratio"] == rows["+state"]["time_ratio"]


def test_the_plan_is_recorded_and_followed(report):
  result, _ = report
  main, compared = result["plans"]
  assert [w["stream"] for w in main["widths"]] == [2, 4, 8]
  assert [w["stream"] for w in compared["widths"]] == [2, 3, 5, 7, 8]
  total = result["config"]["total_steps"]
  for plan in (main, compared):
    assert sum(plan["lengths"]) == total
    assert plan["starts"][-1] <= 0.6 * total
  for run in result["runs"]:
    plan = compared if run["method"].endswith("p_c=0.5") else main
    if run["method"] == "full_width":
      assert [s["widths"]["stream"] for s in run["stages"]] == [8]
      continue
    assert [s["steps"] for s in run["stages"]] == plan["lengths"]
    assert [p["step"] for p in run["preservation"]] == plan["starts"][1:]


def test_growth_keeps_the_function(report):
  result, _ = report
  assert result["preservation_max_error"] < 1e-4
  for run in result["runs"]:
    for check in run["preservation"]:
      assert check["max_abs_error"] < 1e-4
