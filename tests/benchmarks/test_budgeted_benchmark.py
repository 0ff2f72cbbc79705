"""benchmarks/budgeted.py on a tiny network: its report has every method and
budget, SWR stays within each budget, the test split is read only for the
checkpoints chosen on validation, after every run, and the merged model is
the original program.

Timings and accuracies are not asserted on (they depend on the machine and
on a few steps of training).
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import budgeted as bench
from experiments.data import Dataset, Splits, load_digits_splits
from _tiny_efficientnet import TinyNet


BUDGETS = (0.01, 0.05, 0.2, 1.0)
TINY = dataclasses.replace(
    bench.QUICK, epochs=1, stage_epochs=(1, 1, 1), budgets=BUDGETS,
    taps_weights=(1.0, 4.0), warmup_epochs=0, evaluations=2, batch_size=16,
    image_size=8, probe_steps=1, label="test",
    # Two candidates: head-only's rate is picked on validation.
    rates={**bench.QUICK.rates, "head_only": {"learning_rate": (0.01, 0.1)}})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  splits = load_digits_splits(image_size=8, seed=0)
  splits = Splits(*(Dataset(s.images[:n], s.labels[:n])
                    for s, n in zip(splits, (48, 20, 20))))
  model = TinyNet()
  pretrained = (model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  evaluated = []  # "validation" or "test", in call order.
  real_accuracy = bench.accuracy

  def spy(predict, variables, data, batch_size):
    evaluated.append("test" if data is splits.test else
                     "validation" if data is splits.validation else "other")
    return real_accuracy(predict, variables, data, batch_size)

  monkeypatch = pytest.MonkeyPatch()
  monkeypatch.setattr(bench, "accuracy", spy)
  try:
    result = bench.run_benchmark(TINY, splits, pretrained)
  finally:
    monkeypatch.undo()
  bench.print_table(result)
  out = tmp_path_factory.mktemp("budgeted")
  bench.write_json(result, out / "budgeted.json")
  bench.plot(result, out / "budgeted.png")
  return result, evaluated, out


METHODS = ["head_only", "train_all", "multirate", "taps λ=1", "taps λ=4",
           "swr b=0.01", "swr b=0.05", "swr b=0.2", "swr b=1"]


def test_every_method_and_budget_is_reported(report):
  result, _, out = report
  assert [row["method"] for row in result["summary"]] == METHODS
  written = json.loads((out / "budgeted.json").read_text())
  assert [row["method"] for row in written["summary"]] == METHODS
  assert [row["budget_share"] for row in written["summary"]
          if "budget_share" in row] == list(BUDGETS)
  assert (out / "budgeted.png").stat().st_size > 0


def test_swr_never_exceeds_its_budget(report):
  result, _, _ = report
  backbone = result["backbone_parameters"]
  classifier = result["classifier_parameters"]
  for run in result["runs"]:
    if run["method"].startswith("swr"):
      assert run["budget"] == max(1, int(run["budget_share"] * backbone))
      assert run["selected_parameters"] <= run["budget"]
      assert run["updated_parameters"] == (run["selected_parameters"]
                                           + classifier)
  # The largest budget takes every candidate layer; the smallest not all.
  by_share = {run["budget_share"]: run for run in result["runs"]
              if "budget_share" in run}
  assert len(by_share[1.0]["selection"]) == result["candidate_layers"]
  assert by_share[0.01]["selected_parameters"] < result["candidate_parameters"]


def test_updated_parameters_of_the_baselines(report):
  result, _, _ = report
  rows = {row["method"]: row for row in result["summary"]}
  everything = result["backbone_parameters"] + result["classifier_parameters"]
  assert rows["head_only"]["updated_parameters_mean"] == (
      result["classifier_parameters"])
  assert rows["train_all"]["updated_parameters_mean"] == everything
  assert rows["multirate"]["updated_parameters_mean"] == everything
  for row in result["summary"]:
    assert result["classifier_parameters"] <= row[
        "updated_parameters_mean"] <= everything


def test_test_split_is_read_after_selection_on_validation_only(report):
  result, evaluated, _ = report
  runs = result["runs"]
  assert "other" not in evaluated
  # Every test evaluation comes after every validation one: one per run.
  first_test = evaluated.index("test")
  assert set(evaluated[:first_test]) == {"validation"}
  assert evaluated[first_test:] == ["test"] * len(runs)
  for run in runs:
    validation = [p["validation_accuracy"] for p in run["points"]]
    scored = [(v, -i) for i, v in enumerate(validation) if v is not None]
    assert run["chosen_point"] == -max(scored)[1]  # Best, earliest on ties.
    assert run["validation_accuracy"] == validation[run["chosen_point"]]
  head = next(run for run in runs if run["method"] == "head_only")
  assert [s["rates"]["learning_rate"] for s in head["rate_selection"]] == [
      0.01, 0.1]
  assert head["rates"]["learning_rate"] == max(
      head["rate_selection"], key=lambda s: s["validation_accuracy"])[
          "rates"]["learning_rate"]


def test_taps_checkpoints_wait_for_the_penalty(report):
  result, _, _ = report
  for run in result["runs"]:
    if run["method"].startswith("taps"):
      # No warm-up here: every point is eligible.
      assert all(p["validation_accuracy"] is not None for p in run["points"])
      assert run["updated_parameters"] >= result["classifier_parameters"]


def test_merged_model_is_the_original_program_with_equal_outputs(report):
  result, _, _ = report
  merged = result["merged_inference"]
  assert merged["method"] == "swr b=0.05"
  assert merged["same_program_as_original"] is True
  assert merged["outputs_equal"] is True
  assert merged["max_abs_logit_difference"] == 0.0
  assert result["targets"]["merged_same_program"] is True


def test_targets_compare_swr_with_taps_on_no_more_parameters(report):
  result, _, _ = report
  rows = {row["method"]: row for row in result["summary"]}
  for comparison in result["targets"]["swr_vs_taps"]:
    swr = rows[comparison["swr"]]
    fewer = [name for name, row in rows.items() if name.startswith("taps")
             and row["updated_parameters_mean"]
             <= swr["updated_parameters_mean"]]
    assert [t[0] for t in comparison["taps_with_no_more_parameters"]] == fewer
    assert comparison["at_least_as_accurate_as_those"] == all(
        swr["test_accuracy_mean"] >= rows[name]["test_accuracy_mean"]
        for name in fewer)
  gap = (rows["swr b=0.05"]["test_accuracy_mean"]
         - rows["train_all"]["test_accuracy_mean"])
  assert result["targets"]["five_percent_vs_train_all_points"] == (
      pytest.approx(gap))
  assert not math.isnan(gap)
