"""benchmarks/regime_map.py --quick on a tiny network: every cell is there,
each multirate run is planned for T/2 of its own cell's train-all, the train
split is subsampled and the others stay whole, the differences and speed-ups
follow their definitions.

Timings and accuracies are not asserted on (they depend on the machine and
on a few steps of training).
"""

import base64
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from benchmarks import regime_map
from experiments.data import Dataset, Splits, load_digits_splits
from experiments.finetune.tasks import VISION
from _tiny_efficientnet import TinyNet

SIZES = (128, 40, 30)


def hits(point):
  """Which of the 30 test examples a tested point got right, unpacked by
  hand (base64 of numpy's packed bits)."""
  bits = np.unpackbits(np.frombuffer(
      base64.b64decode(point["test_correct"]), np.uint8))
  return bits[:SIZES[2]].astype(bool)


def tiny_task():
  splits = load_digits_splits(image_size=8, seed=0)
  splits = Splits(*(Dataset(s.images[:n], s.labels[:n])
                    for s, n in zip(splits, SIZES)))
  model = TinyNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  return dataclasses.replace(
      VISION, load_splits=lambda settings, path: splits,
      load_pretrained=lambda: (model, variables),
      quick=dataclasses.replace(VISION.quick, batch_size=16, image_size=8,
                                evaluations=2))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("regime")
  monkeypatch = pytest.MonkeyPatch()
  monkeypatch.setitem(regime_map.TASKS, "vision", tiny_task())
  try:
    # A fresh compilation cache: the second share reuses the first's
    # programs.
    regime_map.main(["--quick", "--periods", "2", "--compilation-cache",
                     str(out / "cache"), "--out", str(out), "--name", "map"])
  finally:
    monkeypatch.undo()
  return json.loads((out / "map.json").read_text()), out


def test_every_cell_is_reported_and_the_outputs_written(result):
  report, out = result
  cells = [(r["train_fraction"], r["fast_set"], r["period"])
           for r in report["rows"]]
  assert cells == [(share, fast, k) for share in (0.25, 1.0)
                   for fast in ("classifier", "last_stage") for k in (2,)]
  assert (out / "map.png").stat().st_size > 0
  assert report["command"].startswith("python -m benchmarks.regime_map")


def test_the_train_split_is_subsampled_and_t_keeps_its_steps(result):
  report, _ = result
  assert report["T_steps"] == 128 // 16  # One epoch of the whole split.
  for cell in report["cells"]:
    share = cell["train_fraction"]
    assert cell["split_sizes"] == {"train": round(share * 128),
                                   "validation": 40, "test": 30}
    train_all = next(r for r in cell["runs"] if r["name"] == "train_all")
    assert train_all["runs"][0]["steps"] == report["T_steps"]


def test_every_multirate_run_is_planned_for_half_its_cells_t(result):
  report, _ = result
  for cell in report["cells"]:
    runs = {r["name"]: r for r in cell["runs"]}
    t = runs["train_all"]["runs"][0]["train_seconds"]
    for name, run in runs.items():
      if name != "train_all":
        assert name.endswith("@0.5")
        assert run["runs"][0]["budget_seconds"] == pytest.approx(0.5 * t)


def test_rates_are_the_fixed_recipes_with_the_slow_step_scaled_by_k(result):
  report, _ = result
  for row in report["rows"]:
    selected = regime_map.SELECTED_RATES[row["fast_set"]]
    assert row["rates"] == {
        "fast_learning_rate": selected["fast_learning_rate"],
        "slow_learning_rate": pytest.approx(
            selected["slow_learning_rate"] * row["period"] / 5)}
  for cell in report["cells"]:
    train_all = [r for r in cell["runs"] if r["name"].startswith("train_all")]
    assert [r["rates"] for r in train_all] == [{"learning_rate": 0.003}] * 2


def test_differences_and_speedups_follow_their_definitions(result):
  report, _ = result
  timings = report["timings"]
  for row, cell in ((row, cell) for cell in report["cells"]
                    for row in report["rows"]
                    if row["train_fraction"] == cell["train_fraction"]):
    runs = {r["name"]: r for r in cell["runs"]}
    name = f"multirate_{row['fast_set']}_k{row['period']}@0.5"

    def chosen(result):  # The best validation point within T/2, by hand.
      t = runs["train_all"]["runs"][0]["train_seconds"]
      points = [p for p in result["runs"][0]["points"]
                if p["train_seconds"] <= 0.5 * t * (1 + 1e-9)]
      best = max(p["validation_accuracy"] for p in points)
      return next(p for p in points if p["validation_accuracy"] == best)

    mine, theirs = chosen(runs[name]), chosen(runs["train_all@0.5"])
    # One seed, paired by test example (McNemar): the per-example
    # differences' spread over the 30 test examples.
    a, b = mine["test_accuracy"], theirs["test_accuracy"]
    assert row["difference_mean"] == pytest.approx(100 * (a - b))
    assert row["pairing"] == "seeds and test examples"
    d = hits(mine).astype(float) - hits(theirs)
    assert d.mean() == pytest.approx(a - b)
    z = stats.norm.ppf(0.975)
    assert row["difference_half_width"] == pytest.approx(
        100 * z * d.std(ddof=1) / math.sqrt(30))
    low = row["difference_mean"] - row["difference_half_width"]
    high = row["difference_mean"] + row["difference_half_width"]
    assert row["verdict"] == ("met" if low >= 0 else "missed" if high < 0
                              else "not resolved")
    pace = lambda r: r["runs"][0]["train_seconds"] / r["runs"][0]["steps"]
    assert row["realised_speedup_mean"] == pytest.approx(
        pace(runs["train_all@0.5"]) / pace(runs[name]))
    probe = timings[row["fast_set"]]
    k = row["period"]
    assert row["fast_over_full"] == pytest.approx(
        probe["fast"] / probe["full"])
    assert row["ideal_speedup"] == pytest.approx(
        timings["train_all"] / ((probe["full"] + (k - 1) * probe["fast"]) / k))


def test_an_unknown_fast_set_is_refused():
  with pytest.raises(ValueError, match="unknown fast sets.*'head'"):
    regime_map.regime_methods(VISION, VISION.quick, ["head"], [5], 0.5)
