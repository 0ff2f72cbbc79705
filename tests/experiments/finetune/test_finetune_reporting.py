"""The summary, the table and the files."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.finetune.reporting import format_table, summarise
from experiments.finetune.settings import FULL, METHODS


def test_outputs_table_json_and_plot(tiny_run):
  settings, report, _, (json_path, png_path), _ = tiny_run
  saved = json.loads(Path(json_path).read_text())
  assert [row["name"] for row in saved["summary"]] == [
      method.name for method in METHODS]
  for row in saved["summary"]:
    assert 0 <= row["test_accuracy_mean"] <= 100
    assert row["train_seconds_mean"] > 0
  assert saved["summary"][0]["time_vs_train_all"] == 1.0
  assert saved["settings"]["quick"] is True
  assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = format_table(report["summary"], settings)
  assert table.startswith("QUICK RUN")
  for method in METHODS:
    assert method.label in table


def test_summary_statistics():
  results = [
      {"name": "train_all", "label": "a", "rates": {}, "compile_seconds": 1,
       "share_updated_every_step": 1.0,
       "runs": [{"test_accuracy": 0.9, "train_seconds": 10.0},
                {"test_accuracy": 0.8, "train_seconds": 14.0}]},
      {"name": "other", "label": "b", "rates": {}, "compile_seconds": 1,
       "share_updated_every_step": 0.1,
       "runs": [{"test_accuracy": 0.7, "train_seconds": 6.0}]}]
  first, second = summarise(results)
  assert first["test_accuracy_mean"] == pytest.approx(85.0)
  assert first["test_accuracy_std"] == pytest.approx(np.std([90, 80], ddof=1))
  assert second["test_accuracy_std"] == 0.0
  assert second["time_vs_train_all"] == pytest.approx(0.5)
  assert (first["seeds"], second["seeds"]) == (2, 1)
  table = format_table([first, second], FULL)
  assert "85.00 ± 7.07" in table  # One seed: no spread shown.
  assert "70.00 " in table and "70.00 ±" not in table
