"""benchmarks/budget_sweep.py's options for long sweeps: a method's own
budgets, whole budgets first, partial outputs after each method and the
budgets a stopped run can report. No training: run_experiment is replaced."""

import json

import pytest

from benchmarks import budget_sweep
from experiments.finetune.tasks import VISION


class _Stop(Exception):
  pass


def _planned(monkeypatch, tmp_path, *argv):
  """The variants budget_sweep would run, in order, and its partial JSON
  after a first method."""
  seen = {}

  def fake(task, settings, methods, test_budget_only, on_method):
    seen["methods"] = [(m.name, m.budget_fraction) for m in methods]
    seen["grids"] = settings.grids
    on_method({"methods": ["done"]})
    raise _Stop

  monkeypatch.setattr(budget_sweep, "run_experiment", fake)
  with pytest.raises(_Stop):
    budget_sweep.main([*argv, "--out", str(tmp_path), "--name", "s"])
  partial = json.loads((tmp_path / "s.partial.json").read_text())
  return seen, partial


def test_budget_major_order_and_method_fractions(monkeypatch, tmp_path):
  seen, partial = _planned(
      monkeypatch, tmp_path, "--methods",
      "train_all,multirate_last_stage,gradual_unfreezing_llrd",
      "--fractions", "0.5,1,0.25", "--budget-major",
      "--method-fractions", "gradual_unfreezing_llrd=0.5,1")
  assert seen["methods"] == [
      ("train_all@0.5", 0.5), ("multirate_last_stage@0.5", 0.5),
      ("gradual_unfreezing_llrd@0.5", 0.5), ("train_all", 1.0),
      ("multirate_last_stage@1", 1.0), ("gradual_unfreezing_llrd@1", 1.0),
      ("train_all@0.25", 0.25), ("multirate_last_stage@0.25", 0.25)]
  assert seen["grids"]["gradual_unfreezing_llrd@1"] == (
      VISION.quick.grids["gradual_unfreezing_llrd"])
  assert partial["report"] == {"methods": ["done"]}
  assert partial["method_fractions"] == {"gradual_unfreezing_llrd": [0.5, 1.0]}
  assert partial["fractions"] == [0.5, 1.0, 0.25]


def test_method_fractions_refuses_a_method_not_swept():
  with pytest.raises(ValueError, match="METHOD=F,F with METHOD one of"):
    budget_sweep.method_fractions(["gradual_unfreezing=0.5"], ["train_all"])
  with pytest.raises(ValueError, match="METHOD=F,F"):
    budget_sweep.method_fractions(["train_all"], ["train_all"])


def test_complete_budgets_keeps_budgets_every_baseline_has():
  def result(name, multirate=False, train_all=False):
    return {"name": name, "multirate": multirate, "train_all": train_all}

  results = [result("train_all", train_all=True), result("train_all@0.5"),
             result("train_all@0.25"),
             result("multirate_classifier@0.5", True),
             result("multirate_classifier@0.25", True),
             result("multirate_last_stage@0.5", True),
             result("gradual_unfreezing@0.5"),
             result("gradual_unfreezing@0.25"),
             # A combination with LLRD is not a baseline: its missing T/4
             # keeps the budget.
             result("multirate_last_stage_llrd@0.5", True)]
  kept = [r["name"] for r in budget_sweep.complete_budgets(results, VISION)]
  # multirate_last_stage has no T/4 run: T/4 is left out; T (train-all
  # alone) is kept, train-all's run setting T.
  assert kept == ["train_all", "train_all@0.5", "multirate_classifier@0.5",
                  "multirate_last_stage@0.5", "gradual_unfreezing@0.5",
                  "multirate_last_stage_llrd@0.5"]


def test_budget_major_without_t_among_the_fractions(monkeypatch, tmp_path):
  # Train-all for T is added when T is not swept, and goes last.
  seen, _ = _planned(monkeypatch, tmp_path, "--methods",
                     "train_all,multirate_last_stage", "--fractions", "0.5",
                     "--budget-major")
  assert seen["methods"] == [("train_all@0.5", 0.5),
                             ("multirate_last_stage@0.5", 0.5),
                             ("train_all", 1.0)]


def test_grid_refuses_the_options_of_a_sweep_of_methods(capsys):
  with pytest.raises(SystemExit):
    budget_sweep.main(["--grid", "--budget-major"])
  assert "not with --grid" in capsys.readouterr().err


def cell(accuracy):
  """A sweep-table cell of one seed, without per-example hits."""
  return {"test": [accuracy], "test_correct": [None],
          "validation_mean": 100 * accuracy}


def test_targets_skip_a_budget_no_two_rate_multirate_has():
  from experiments.finetune.sweep import check_sweep_targets

  table = {"train_all": {"0.5": cell(.8), "0.25": cell(.7), "1": cell(.9)},
           "multirate_last_stage": {"0.5": cell(.85)}}
  targets = check_sweep_targets(table, 100, ["multirate_last_stage"])
  assert [t["target"].split(",")[0] for t in targets] == ["at T/2", "at T/2"]


def test_the_t4_target_compares_multirate_with_the_baselines_only():
  """Issue 18's T/4 target is against train-all and the baselines; issue
  19's timetables are compared with two-rate multirate by their own target,
  not counted as baselines."""
  from experiments.finetune.sweep import check_sweep_targets

  table = {"train_all": {"0.25": cell(.7)},
           "multirate_last_stage": {"0.25": cell(.85)},
           "train_last_stage": {"0.25": cell(.8)},
           "gradual_unfreezing": {"0.25": cell(.9)}}
  targets = check_sweep_targets(table, 100, ["multirate_last_stage"],
                                timetables=["gradual_unfreezing"])
  assert [t["against"] for t in targets] == ["train_all", "train_last_stage"]
  assert len(check_sweep_targets(table, 100, ["multirate_last_stage"])) == 3
