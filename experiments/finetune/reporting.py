"""The experiment's results: summary, table, plot and files.

Outputs under ``--out``: ``finetune.json`` (settings, every run, the summary),
``finetune.png`` (test accuracy against training time, error bars over
seeds), and the printed table.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.finetune.selection import format_rates, rate_candidates
from experiments.finetune.settings import Settings


def summarise(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation (over seeds) of accuracy and time per method.

  The standard deviation is the sample one (``ddof=1``), 0 for a single seed.
  ``time_vs_train_all`` divides by ``train_all``'s mean time, if present.
  """
  rows = []
  for result in results:
    accuracies = np.array([r["test_accuracy"] for r in result["runs"]]) * 100
    seconds = np.array([r["train_seconds"] for r in result["runs"]])
    ddof = 1 if len(accuracies) > 1 else 0
    rows.append({
        "name": result["name"], "label": result["label"],
        "rates": result["rates"],
        "test_accuracy_mean": float(accuracies.mean()),
        "test_accuracy_std": float(accuracies.std(ddof=ddof)),
        "seeds": len(accuracies),
        "train_seconds_mean": float(seconds.mean()),
        "train_seconds_std": float(seconds.std(ddof=ddof)),
        "compile_seconds": result["compile_seconds"],
        "share_updated_every_step": result["share_updated_every_step"],
    })
  baseline = {row["name"]: row["train_seconds_mean"] for row in rows}.get(
      "train_all")
  for row in rows:
    row["time_vs_train_all"] = (row["train_seconds_mean"] / baseline
                                if baseline else None)
  return rows


def describe(settings: Settings) -> str:
  """One line saying what was run; quick runs say so first."""
  kind = ("QUICK RUN (reduced: use --full for the experiment as specified)"
          if settings.quick else "FULL RUN")
  selected = any(len(rate_candidates(grid)) > 1
                 for grid in settings.grids.values())
  rates = ("rates selected on the validation split" if selected else
           "rates fixed (the selections of the full run with BatchNorm "
           "frozen, on the validation split)")
  return (f"{kind}: {settings.epochs} epochs, batch {settings.batch_size}, "
          f"{settings.image_size}x{settings.image_size} images, k = "
          f"{settings.period} (unless a label says otherwise), BatchNorm {settings.bn}, seeds "
          f"{list(settings.seeds)}, {rates}")


def format_table(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
  """The summary as a plain-text table."""
  header = ("method", "rates", "test acc. %", "train s", "x train-all",
            "compile s", "every step")
  lines = [[row["label"], format_rates(row["rates"]),
            f"{row['test_accuracy_mean']:.2f}" + (
                f" ± {row['test_accuracy_std']:.2f}" if row["seeds"] > 1
                else ""),
            f"{row['train_seconds_mean']:.1f}",
            ("-" if row["time_vs_train_all"] is None
             else f"{row['time_vs_train_all']:.2f}"),
            f"{row['compile_seconds']:.1f}",
            f"{100 * row['share_updated_every_step']:.2f}%"] for row in rows]
  widths = [max(len(str(cells[i])) for cells in [header, *lines])
            for i in range(len(header))]
  render = lambda cells: "  ".join(
      str(c).ljust(w) if i < 2 else str(c).rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths)))
  rule = "-" * len(render(header))
  return "\n".join([describe(settings), rule, render(header), rule,
                    *map(render, lines), rule])


def plot(rows: Sequence[Mapping[str, Any]], settings: Settings, data_name: str,
         path: Path) -> None:
  """Test accuracy against training time, one marker per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(7.5, 5))
  markers = itertools.cycle("os^Dvp*hX")
  for row in rows:
    axes.errorbar(row["train_seconds_mean"], row["test_accuracy_mean"],
                  xerr=row["train_seconds_std"], yerr=row["test_accuracy_std"],
                  marker=next(markers), markersize=8, capsize=4, linestyle="",
                  label=row["label"])
  axes.set_xlabel("training time (s, compilation excluded)")
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(("Quick run: " if settings.quick else "")
                 + f"EfficientNet-Lite0 fine-tuned on {data_name}", fontsize=11)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, loc="lower right")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def machine() -> dict[str, Any]:
  return {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
          "platform": platform.platform(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_outputs(report: Mapping[str, Any], settings: Settings,
                  out: Path) -> tuple[Path, Path]:
  """Writes ``finetune.json`` and ``finetune.png`` under ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  json_path, png_path = out / "finetune.json", out / "finetune.png"
  json_path.write_text(json.dumps(report, indent=2))
  plot(report["summary"], settings, report["data"], png_path)
  return json_path, png_path
