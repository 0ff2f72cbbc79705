"""benchmarks/text_bucketing.py --quick: the table's figures follow from the
measured ones, the distribution counts every text, the logits agree.

Timings are not asserted on."""

import json

import pytest

from benchmarks import text_bucketing


def test_quick_run_writes_its_figures(tmp_path, capsys):
  out = tmp_path / "bucketing.json"
  text_bucketing.main(["--quick", "--repeats", "1", "--steps", "1",
                       "--json", str(out)])
  report = json.loads(out.read_text())
  buckets = report["buckets"]
  assert buckets == [8, 16, 24, 32, 40, 48]
  lengths = report["lengths"]
  assert lengths["texts"] == 4866
  assert (sum(lengths["texts_per_bucket"].values()) + lengths["truncated"]
          == 4866)
  for phase in ("train", "evaluation"):
    shares = report["batch_bucket_shares"][phase]
    assert sum(shares.values()) == pytest.approx(1.0)
  steps = {int(k): v for k, v in report["train_step_seconds"].items()}
  assert all(t > 0 for t in steps.values())
  mean = sum(share * steps[int(length)] for length, share in
             report["batch_bucket_shares"]["train"].items())
  assert report["train_mean_step_bucketed_over_padded"] == pytest.approx(
      mean / steps[48])
  seconds = report["validation"]["seconds"]
  assert report["validation_bucketed_over_padded"] == pytest.approx(
      seconds["bucketed"] / seconds["padded"])
  accuracy = report["validation"]["accuracy"]
  assert accuracy["bucketed"] == accuracy["padded"]
  agreement = report["logit_agreement"]
  assert agreement["predictions_differing"] == 0
  assert agreement["max_abs_logit_difference"] < 1e-4 * max(
      1.0, agreement["max_abs_logit"])
  assert "validation pass (200 texts)" in capsys.readouterr().out
