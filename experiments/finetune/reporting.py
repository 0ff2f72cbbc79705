"""The experiment's results: time-to-accuracy summary, targets, table, curves, files.

Everything is measured against train-all's training time ``T`` on the same
seed (:mod:`experiments.finetune.budget`): per method and seed, the test
accuracy of the model validation picks within ``T / 2`` and within ``T``, and
the time until the picked model reaches train-all's accuracy at ``T`` minus
0.5 points. The multirate variant reported as "multirate" at a budget is the
one with the best mean validation accuracy within that budget.

Outputs under ``--out``: ``finetune_<task>.json`` (settings, every run with
its evaluation points, the summary, the targets), ``finetune_<task>.png``
(test accuracy against training time: mean over seeds, a band from the lowest
to the highest seed), and the printed table.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from experiments.finetune.budget import aggregate_curves, at_budget, time_to_target
from experiments.finetune.selection import format_rates, rate_candidates
from experiments.finetune.settings import Settings

# Budgets reported, as fractions of train-all's time: the table's two and the
# text target's 0.55.
FRACTIONS = (0.5, 0.55, 1.0)
TARGET_MARGIN = 0.005  # Train-all's accuracy minus 0.5 points.


def _budgets(results: Sequence[Mapping[str, Any]]) -> dict[int, float]:
  """Train-all's training seconds per seed; without train-all, none."""
  for result in results:
    if result.get("train_all"):
      return {run["seed"]: run["train_seconds"] for run in result["runs"]}
  return {}


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
  if not values:
    return None, 0.0
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1 if len(values) > 1
                                                else 0))


def seed_figures(run: Mapping[str, Any], budget: float,
                 target: Optional[float]) -> dict[str, Any]:
  """One run's figures at each budget fraction, and its time to ``target``."""
  ttt = None if target is None else time_to_target(run["points"], target)
  return {
      "seed": run["seed"], "budget_seconds": budget,
      "at": {f"{f:g}": at_budget(run["points"], f * budget)
             for f in FRACTIONS},
      "target_accuracy": target,
      "time_to_target_seconds": ttt,
      "time_to_target_vs_train_all": None if ttt is None else ttt / budget,
      "epochs": run["epochs"], "planned_epochs": run["planned_epochs"],
      "train_seconds": run["train_seconds"],
      "step_seconds": (run["train_seconds"] / run["steps"] if run["steps"]
                       else None),
  }


def summarise(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per method: each seed's figures, and their mean and spread over seeds.

  Budgets are train-all's times per seed; without train-all each run's own
  time (and no target).
  """
  budgets = _budgets(results)
  targets = {}
  for result in results:
    if result.get("train_all"):
      targets = {run["seed"]: at_budget(run["points"], budgets[run["seed"]])[
          "test_accuracy"] - TARGET_MARGIN for run in result["runs"]}
  rows = []
  for result in results:
    per_seed = [seed_figures(run, budgets.get(run["seed"],
                                              run["train_seconds"]),
                             targets.get(run["seed"]))
                for run in result["runs"]]
    row = {"name": result["name"], "label": result["label"],
           "multirate": result.get("multirate", False),
           "train_all": result.get("train_all", False),
           "rates": result["rates"], "seeds": len(per_seed)}
    for fraction in FRACTIONS:
      for split in ("test", "validation"):
        mean, std = _mean_std([100 * s["at"][f"{fraction:g}"][
            f"{split}_accuracy"] for s in per_seed])
        row[f"{split}_at_{fraction:g}_mean"] = mean
        row[f"{split}_at_{fraction:g}_std"] = std
    reached = [s["time_to_target_vs_train_all"] for s in per_seed
               if s["time_to_target_vs_train_all"] is not None]
    row["target_reached"] = len(reached)
    row["time_to_target_vs_train_all_mean"] = _mean_std(reached)[0]
    row["epochs_mean"] = _mean_std([s["epochs"] for s in per_seed])[0]
    row["step_seconds_mean"] = _mean_std(
        [s["step_seconds"] for s in per_seed if s["step_seconds"]])[0]
    row["compile_seconds"] = result["compile_seconds"]
    row["share_updated_every_step"] = result["share_updated_every_step"]
    row["per_seed"] = per_seed
    rows.append(row)
  return rows


def chosen_multirate(rows: Sequence[Mapping[str, Any]],
                     fraction: float = 1.0) -> Optional[str]:
  """The multirate variant with the best mean validation accuracy within
  ``fraction`` of train-all's time (the first on ties): what a user with
  that budget would pick. ``None`` without multirate."""
  candidates = [row for row in rows if row["multirate"]]
  if not candidates:
    return None
  key = f"validation_at_{fraction:g}_mean"
  best = max(range(len(candidates)),
             key=lambda i: (candidates[i][key], -i))
  return candidates[best]["name"]


def check_targets(rows: Sequence[Mapping[str, Any]],
                  task: str) -> list[dict[str, Any]]:
  """The issue's targets, each with whether it was met and the figures.

  "Multirate" at a budget is the variant chosen on validation at that budget
  (:func:`chosen_multirate`). Both tasks: at half of train-all's time,
  multirate at least as accurate as every other method (multirate's other
  variants aside). Text also: multirate within 1.0 point of train-all (at
  its full time) at 0.55 of its time, and more accurate than head-only at
  half and at full time.
  """
  by_name = {row["name"]: row for row in rows}
  train_all = next((row for row in rows if row["train_all"]), None)
  if chosen_multirate(rows) is None or train_all is None:
    return []
  chosen = lambda fraction: by_name[chosen_multirate(rows, fraction)]
  at = lambda row, fraction: row[f"test_at_{fraction:g}_mean"]
  targets = []
  others = [row for row in rows if not row["multirate"]]
  half = chosen(0.5)
  best_other = max(others, key=lambda row: at(row, 0.5))
  targets.append({
      "target": "at T/2, multirate >= every other method",
      "met": at(half, 0.5) >= at(best_other, 0.5),
      "measured": f"{half['label']} {at(half, 0.5):.2f}% vs best other "
                  f"({best_other['label']}) {at(best_other, 0.5):.2f}%"})
  if task == "text":
    early = chosen(0.55)
    gap = at(train_all, 1) - at(early, 0.55)
    targets.append({
        "target": "multirate within 1.0 point of train-all at <= 0.55 T",
        "met": gap <= 1.0,
        "measured": f"{early['label']} {at(early, 0.55):.2f}% at 0.55 T vs "
                    f"train-all {at(train_all, 1):.2f}% at T (gap {gap:.2f} "
                    "points)"})
    head = by_name.get("train_head")
    if head is not None:
      pairs = [(fraction, at(chosen(fraction), fraction), at(head, fraction))
               for fraction in (0.5, 1.0)]
      targets.append({
          "target": "multirate more accurate than head-only at equal time",
          "met": all(ours > theirs for _, ours, theirs in pairs),
          "measured": ", ".join(
              f"at {fraction:g} T {ours:.2f}% vs {theirs:.2f}%"
              for fraction, ours, theirs in pairs)})
  return targets


def describe(task: Any, settings: Settings,
             data_name: Optional[str] = None) -> str:
  """One line saying what was run; quick runs say so first."""
  kind = ("QUICK RUN (reduced: use --full for the experiment as specified)"
          if settings.quick else "FULL RUN")
  selected = any(len(rate_candidates(settings.grids[m.name])) > 1
                 for m in task.methods_in(settings))
  rates = ("rates selected on the validation split" if selected else
           "rates fixed (one grid point per method)")
  data = task.data_name if data_name is None else data_name
  return (f"{kind}, {task.name}: {task.model_name} on {data}; "
          f"train-all {settings.epochs} epochs, the others as many as fit in "
          f"its time; batch {settings.batch_size}, {task.describe(settings)}, "
          f"k = {settings.period} (unless a label says otherwise), seeds "
          f"{list(settings.seeds)}, {rates}"
          + ("; training time in CPU seconds of the process"
             if settings.clock == "process" else ""))


def _spread(mean: Optional[float], std: float, seeds: int) -> str:
  if mean is None:
    return "-"
  return f"{mean:.2f}" + (f" ± {std:.2f}" if seeds > 1 else "")


def format_table(rows: Sequence[Mapping[str, Any]], description: str,
                 targets: Sequence[Mapping[str, Any]] = ()) -> str:
  """The summary as a plain-text table, then the chosen variant and targets."""
  header = ("method", "rates", "test % at T/2", "test % at T",
            "to target (x T)", "epochs", "s/step", "compile s", "every step")
  lines = []
  for row in rows:
    if row["time_to_target_vs_train_all_mean"] is None:
      to_target = "not reached" if row["target_reached"] == 0 and any(
          s["target_accuracy"] is not None for s in row["per_seed"]) else "-"
    else:
      to_target = f"{row['time_to_target_vs_train_all_mean']:.2f}" + (
          f" ({row['target_reached']}/{row['seeds']})"
          if row["target_reached"] < row["seeds"] or row["seeds"] > 1 else "")
    lines.append([
        row["label"], format_rates(row["rates"]),
        _spread(row["test_at_0.5_mean"], row["test_at_0.5_std"], row["seeds"]),
        _spread(row["test_at_1_mean"], row["test_at_1_std"], row["seeds"]),
        to_target, f"{row['epochs_mean']:.1f}",
        "-" if row["step_seconds_mean"] is None
        else f"{row['step_seconds_mean']:.3f}",
        f"{row['compile_seconds']:.1f}",
        f"{100 * row['share_updated_every_step']:.3g}%"])
  widths = [max(len(str(cells[i])) for cells in [header, *lines])
            for i in range(len(header))]
  render = lambda cells: "  ".join(
      str(c).ljust(w) if i < 2 else str(c).rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths)))
  rule = "-" * len(render(header))
  footer = ["T: train-all's training time on the same seed (evaluation and "
            "compilation excluded); test accuracy of the checkpoint with the "
            "best validation accuracy within the budget; target: train-all's "
            "accuracy at T minus 0.5 points."]
  if chosen_multirate(rows) is not None:
    label = lambda name: next(row["label"] for row in rows
                              if row["name"] == name)
    footer.append("multirate chosen on validation: " + "; ".join(
        f"within {fraction:g} T: {label(chosen_multirate(rows, fraction))}"
        for fraction in FRACTIONS))
  for target in targets:
    footer.append(f"target {'MET' if target['met'] else 'MISSED'}: "
                  f"{target['target']}: {target['measured']}")
  return "\n".join([description, rule, render(header), rule,
                    *map(render, lines), rule, *footer])


def curves(results: Sequence[Mapping[str, Any]], points: int = 200,
           ) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
  """Each method's test-accuracy curve against training time (seconds).

  Returns:
    The times (from 0 to the longest train-all time, or the longest run
    without train-all), and per method name its mean, low and high over
    seeds (:func:`experiments.finetune.budget.aggregate_curves`), in %.
  """
  budgets = _budgets(results)
  end = max(budgets.values()) if budgets else max(
      run["train_seconds"] for result in results for run in result["runs"])
  times = np.linspace(0.0, end, points)
  return times, {result["name"]: {k: 100 * v for k, v in aggregate_curves(
      [run["points"] for run in result["runs"]], times).items()}
                 for result in results}


def plot(report: Mapping[str, Any], path: Path) -> None:
  """Test accuracy against training time: one curve and band per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  results, rows = report["methods"], report["summary"]
  times, by_name = curves(results)
  chosen = chosen_multirate(rows)
  figure, axes = plt.subplots(figsize=(8, 5.5))
  styles = itertools.cycle(["-", "--", "-.", ":"])
  for row in rows:
    curve = by_name[row["name"]]
    width = 2.5 if row["name"] == chosen or row["train_all"] else 1.4
    line, = axes.plot(times, curve["mean"], linestyle=next(styles),
                      linewidth=width, drawstyle="steps-post",
                      label=row["label"] + (" (chosen at T)"
                                            if row["name"] == chosen
                                            else ""))
    axes.fill_between(times, curve["low"], curve["high"], step="post",
                      color=line.get_color(), alpha=0.15, linewidth=0)
  budgets = _budgets(results)
  if budgets:
    budget = float(np.mean(list(budgets.values())))
    for fraction in (0.5, 1.0):
      axes.axvline(fraction * budget, color="grey", linewidth=0.8,
                   linestyle=":")
      axes.text(fraction * budget, 1.0, f" {fraction:g} T",
                transform=axes.get_xaxis_transform(), va="top", fontsize=8,
                color="grey")
  half = [row["test_at_0.5_mean"] for row in rows
          if row["test_at_0.5_mean"] is not None]
  if half:
    axes.set_ylim(bottom=max(0.0, min(half) - 10.0))
  axes.set_xlabel("training time (s; evaluation and compilation excluded)")
  axes.set_ylabel("test accuracy (%) of the best model on validation so far")
  seeds = len(results[0]["runs"]) if results else 0
  axes.set_title(("Quick run: " if report["settings"]["quick"] else "")
                 + f"{report['model']} fine-tuned on {report['data']} "
                 f"(mean of {seeds} seed{'s' if seeds > 1 else ''}"
                 + (", band: min-max)" if seeds > 1 else ")"), fontsize=10)
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


def _json_safe(value: Any) -> Any:
  """Floats that JSON can hold (NaN and infinities as ``None``)."""
  if isinstance(value, float) and not np.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_outputs(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
  """Writes ``finetune_<task>.json`` and ``finetune_<task>.png`` under ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  stem = f"finetune_{report['task']}"
  json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
  json_path.write_text(json.dumps(_json_safe(dict(report)), indent=2))
  plot(report, png_path)
  return json_path, png_path
