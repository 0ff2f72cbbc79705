"""The step-speed benchmark runs and reports the figures it promises.

Timings are not asserted on (they depend on the machine); the derived columns
are checked against their definitions.
"""

import json

import pytest

from benchmarks import step_speed


def test_step_speed_writes_its_table_as_json(tmp_path, capsys):
  out = tmp_path / "speed.json"
  step_speed.main(["--quick", "--models", "transformer", "--periods", "3",
                   "--dispatch", "host", "cond", "--cond-periods", "3",
                   "--batch-size", "2", "--json", str(out)])
  report = json.loads(out.read_text())
  rows = report["rows"]
  assert [(r["model"], r["dispatch"], r["k"]) for r in rows] == [
      ("transformer", "host", 3), ("transformer", "cond", 3)]
  for r in rows:
    k = r["k"]
    assert r["speedup"] == pytest.approx(r["t_full_ms"] / r["t_step_ms"])
    assert r["ideal"] == pytest.approx(
        r["t_full_ms"] / ((r["t_full_ms"] + (k - 1) * r["t_fast_ms"]) / k))
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"])
  assert "eff." in capsys.readouterr().out
  assert sum(r["auto"] for r in rows) == 1
