"""The regime map: where multirate beats train-all at equal budget, and why.

Run from the repository root::

  python -m benchmarks.regime_map            # vision, 3 seeds, 12 cells
  python -m benchmarks.regime_map --quick    # one seed, k = 5, 4 cells

On one image task (the digits by default), for each *cell* of the map,

* the fast set (``classifier``: the classifier fast, no drift;
  ``last_stage``: the last stage, the conv head and the classifier fast, with
  drift), which sets ``t_fast / t_full``;
* k, the multirate period (2, 5, 10), which with ``t_fast / t_full`` sets
  multirate's speed-up ``t_train_all / ((t_full + (k - 1) t_fast) / k)``;
* the share of the train split used (25% and 100%, a stratified subsample,
  :func:`experiments.data.stratified_subset`; validation and test stay
  whole), which sets how many distinct examples train-all's steps see,

multirate planned for ``B = f T`` (``f = 1/2`` by default) runs on every seed
against train-all planned for the same ``B``, ``T`` being train-all's
training time on that cell's data and seed (train-all planned for ``T`` runs
first and sets it, as in :mod:`benchmarks.budget_sweep`; the runs are
:func:`experiments.finetune.experiment.run_experiment`'s, each tested only at
its own budget). ``T`` is ``--epochs`` epochs *of the whole train split* in
every cell: on a subsample train-all makes the same number of steps (more
epochs), so the cells differ in the data, not in train-all's step budget.

Each cell reports the difference multirate - train-all at ``B``, paired by
seed and test example, with its 95% interval and verdict
(:func:`experiments.finetune.sweep.compared`), the same against train-all at
``T`` (the issue's "within 0.5 points" target), the speed-up multirate realised in its runs (train-all's
seconds per step over multirate's, both planned for ``B``, per seed), and,
from a timing probe in the same process (the task's own steps: train-all's,
multirate's full-step and fast-step programs, medians of interleaved blocks
after warm-up, :func:`benchmarks.step_speed.measure`), ``t_fast / t_full``
and the ideal speed-up at each k.

Recipes: fixed, chosen on validation by the budget sweep's grids
(docs/benchmarks/budget_sweep.md; **not** re-chosen per cell, and never on
the test split): train-all ``h = 0.003`` (its grid winner at every budget);
multirate with the classifier fast ``h_F = 0.001, h_S = 0.003`` and with the
last stage + head fast ``h_F = 0.003, h_S = 0.005`` (the winners at k = 5),
with ``h_S`` (the slow step per cycle) scaled by ``k / 5`` at other k, so
that the slow parameters move as far per step as in the selected recipe.

Prints the table and writes ``benchmarks/results/regime_map_<task>[_quick]``
``.json`` and ``.png`` (the difference against the speed-up, a panel per
share of the train split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from benchmarks.budget_sweep import EVALUATIONS, RESULTS
from experiments.compilation_cache import (
    add_compilation_cache_arguments, compilation_cache_directory,
    enable_compilation_cache)
from benchmarks.step_speed import Runner, measure
from experiments.data import Splits, stratified_subset
from experiments.finetune.experiment import CLOCKS, run_experiment
from experiments.finetune.reporting import _json_safe, machine
from experiments.finetune.settings import Method, Rates, Settings
from experiments.finetune.sweep import (
    budget_variants, compared, sweep_table, variant_name)
from experiments.finetune.tasks import TASKS, Task
from experiments.finetune.training import (
    dropout_key, init_optimizer_state, make_step, split_variables)
import multirate_optax as mo

# The fast sets: each names the task's multirate method that has it.
FAST_SETS = {"classifier": "multirate_classifier",
             "last_stage": "multirate_last_stage"}
TRAIN_ALL_RATE = 0.003
# The budget sweep's grid winners on validation at k = 5 (vision digits):
# classifier fast (no drift) and last stage + head fast (drift, at T/2).
SELECTED_PERIOD = 5
SELECTED_RATES = {
    "classifier": {"fast_learning_rate": 0.001, "slow_learning_rate": 0.003},
    "last_stage": {"fast_learning_rate": 0.003, "slow_learning_rate": 0.005},
}
PERIODS = (2, 5, 10)
TRAIN_FRACTIONS = (0.25, 1.0)
BUDGET_FRACTION = 0.5


def multirate_rates(fast_set: str, period: int) -> Rates:
  """The fixed recipe of a fast set at period k: the selected one, its slow
  step per cycle scaled by ``k / 5`` (the same slow displacement per step).

  Example:
    >>> multirate_rates("last_stage", 10)
    {'fast_learning_rate': 0.003, 'slow_learning_rate': 0.01}
  """
  rates = dict(SELECTED_RATES[fast_set])
  rates["slow_learning_rate"] = round(
      rates["slow_learning_rate"] * period / SELECTED_PERIOD, 12)
  return rates


def multirate_name(fast_set: str, period: int) -> str:
  """A cell's multirate method before its budget, ``multirate_<set>_k<k>``."""
  return f"multirate_{fast_set}_k{period}"


def regime_methods(task: Task, settings: Settings, fast_sets: Sequence[str],
                   periods: Sequence[int], fraction: float
                   ) -> tuple[list[Method], Settings]:
  """Train-all planned for ``T`` and for ``fraction T``, and every fast set
  and k of multirate planned for ``fraction T``; settings whose grids hold
  each one's fixed rates.

  Example:
    >>> from experiments.finetune.tasks import VISION
    >>> methods, settings = regime_methods(VISION, VISION.quick,
    ...                                    ["classifier"], [2], 0.5)
    >>> [(m.name, m.period, m.budget_fraction) for m in methods]
    [('train_all@0.5', None, 0.5), ('train_all', None, 1.0), \
('multirate_classifier_k2@0.5', 2, 0.5)]
    >>> settings.grids['multirate_classifier_k2@0.5']
    {'fast_learning_rate': (0.001,), 'slow_learning_rate': (0.0012,)}
  """
  unknown = sorted(set(fast_sets) - set(FAST_SETS))
  if unknown:
    raise ValueError(f"unknown fast sets {unknown}; choose among "
                     f"{sorted(FAST_SETS)}.")
  train_all = task.method("train_all")
  multirate, grids = [], {"train_all": {"learning_rate": (TRAIN_ALL_RATE,)}}
  for fast_set in fast_sets:
    base = task.method(FAST_SETS[fast_set])
    for period in periods:
      name = multirate_name(fast_set, period)
      multirate.append(dataclasses.replace(
          base, name=name, period=period, label=f"{base.label}, k = {period}"))
      grids[name] = {rate: (value,) for rate, value in
                     multirate_rates(fast_set, period).items()}
  # Only train-all by name: what run_experiment's description reads.
  settings = dataclasses.replace(settings, grids=grids, methods=("train_all",))
  plain, settings = budget_variants([train_all], settings, (fraction, 1.0))
  variants, settings = budget_variants(multirate, settings, (fraction,))
  return plain + variants, settings


def step_times(task: Task, settings: Settings, fast_sets: Sequence[str],
               pretrained: Any, splits: Splits, repeats: int,
               steps_per_block: int = 4) -> dict[str, Any]:
  """Seconds per step of train-all and of each fast set's full and fast
  programs (k = ``settings.period``), medians of interleaved blocks after a
  warm-up block each, on ``settings.clock``.

  Returns:
    ``{'train_all': s, fast_set: {'full': s, 'fast': s, 'fast_over_full',
    'full_over_train_all'}}``.
  """
  model, variables = task.fresh_variables(pretrained, 0, splits.num_classes)
  loss = task.make_loss(model, settings)
  batch = (splits.train[0][:settings.batch_size],
           splits.train[1][:settings.batch_size])
  key, number = dropout_key(0), np.int32(0)
  clock = CLOCKS[settings.clock]

  def runner(method: Method, rates: Rates, phase: Optional[str]) -> Runner:
    copied = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), variables)
    params, state = split_variables(copied)
    optimizer = task.make_optimizer(method, rates, settings, 1000)
    opt_state = init_optimizer_state(method, optimizer, params)
    step = make_step(method, loss, optimizer, params)
    if phase is not None:  # One phase's program, on every step.
      timetable = mo.find_timetable_state(opt_state).timetable
      index = timetable.phase(0 if phase == "full" else 1)
      step = step.program(params, opt_state, state, *batch, key, number,
                          phase=index).compile()

    def run(carry, batch):
      params, opt_state, state = carry
      params, opt_state, (value, state) = step(params, opt_state, state,
                                               *batch, key, number)
      return (params, opt_state, state), value

    return Runner(run, (params, opt_state, state), batch, steps_per_block,
                  repeats, clock=clock)

  runners = {"train_all": runner(task.method("train_all"),
                                 {"learning_rate": TRAIN_ALL_RATE}, None)}
  for fast_set in fast_sets:
    method = task.method(FAST_SETS[fast_set])
    rates = multirate_rates(fast_set, settings.period)
    for phase in ("full", "fast"):
      runners[fast_set, phase] = runner(method, rates, phase)
  times = measure(runners)
  result: dict[str, Any] = {"train_all": times["train_all"],
                            "period": settings.period,
                            "repeats": repeats,
                            "steps_per_block": steps_per_block,
                            "clock": settings.clock}
  for fast_set in fast_sets:
    full, fast = times[fast_set, "full"], times[fast_set, "fast"]
    result[fast_set] = {"full": full, "fast": fast,
                        "fast_over_full": fast / full,
                        "full_over_train_all": full / times["train_all"]}
  return result


def ideal_speedup(train_all: float, full: float, fast: float,
                  period: int) -> float:
  """``t_train_all`` over multirate's mean step over a cycle of k steps.

  Example:
    >>> ideal_speedup(1.0, 1.0, 0.5, 5)  # 1 / ((1 + 4 * 0.5) / 5)
    1.6666666666666667
  """
  return train_all / ((full + (period - 1) * fast) / period)


def _seconds_per_step(result: Mapping[str, Any]) -> list[float]:
  return [run["train_seconds"] / run["steps"] for run in result["runs"]]


def cell_rows(report: Mapping[str, Any], fast_sets: Sequence[str],
              periods: Sequence[int], fraction: float,
              train_fraction: float) -> list[dict[str, Any]]:
  """The map's rows of one share of the train split, from its report."""
  test_size = report["split_sizes"]["test"]
  table = sweep_table(report["methods"], test_size)
  results = {result["name"]: result for result in report["methods"]}
  key = f"{fraction:g}"
  baseline = table["train_all"][key]
  at_t = table["train_all"]["1"]
  baseline_pace = _seconds_per_step(
      results[variant_name(Method("train_all", ""), fraction)])
  rows = []
  for fast_set in fast_sets:
    for period in periods:
      name = multirate_name(fast_set, period)
      row = table[name][key]
      ahead = compared(row, baseline, test_size, 0.0, {})
      versus_t = compared(row, at_t, test_size, -0.5, {})
      pace = _seconds_per_step(results[variant_name(Method(name, ""),
                                                    fraction)])
      realised = [b / m for b, m in zip(baseline_pace, pace)]
      rows.append({
          "train_fraction": train_fraction,
          "train_examples": report["split_sizes"]["train"],
          "fast_set": fast_set, "period": period, "rates": row["rates"],
          "seeds": row["seeds"],
          "multirate_test": row["test"], "train_all_test": baseline["test"],
          "train_all_at_T_test": at_t["test"],
          "multirate_mean": row["test_mean"],
          "multirate_half_width": row["test_half_width"],
          "train_all_mean": baseline["test_mean"],
          "train_all_half_width": baseline["test_half_width"],
          "train_all_at_T_mean": at_t["test_mean"],
          "difference_mean": ahead["difference_mean"],
          "difference_half_width": ahead["difference_half_width"],
          "verdict": ahead["verdict"], "pairing": ahead["pairing"],
          "versus_T_mean": versus_t["difference_mean"],
          "versus_T_half_width": versus_t["difference_half_width"],
          "versus_T_verdict": versus_t["verdict"],
          "multirate_validation_mean": row["validation_mean"],
          "train_all_validation_mean": baseline["validation_mean"],
          "realised_speedup": realised,
          "realised_speedup_mean": float(np.mean(realised)),
      })
  return rows


def add_timings(rows: list[dict[str, Any]], timings: Mapping[str, Any]
                ) -> None:
  """Each row's ``t_fast / t_full`` and ideal speed-up, from the probe."""
  for row in rows:
    probe = timings[row["fast_set"]]
    row["fast_over_full"] = probe["fast_over_full"]
    row["ideal_speedup"] = ideal_speedup(timings["train_all"], probe["full"],
                                         probe["fast"], row["period"])


def run_regime_map(task: Task, settings: Settings,
                   fast_sets: Sequence[str] = tuple(FAST_SETS),
                   periods: Sequence[int] = PERIODS,
                   train_fractions: Sequence[float] = TRAIN_FRACTIONS,
                   fraction: float = BUDGET_FRACTION,
                   splits: Optional[Splits] = None, pretrained: Any = None,
                   timing_repeats: int = 6,
                   partial: Optional[Path] = None) -> dict[str, Any]:
  """Every cell of the map: one :func:`run_experiment` per share of the
  train split (train-all at ``T`` and at ``fraction T``, every fast set and
  k at ``fraction T``, on every seed of ``settings``), then the timing probe.

  ``settings.epochs`` is ``T`` in epochs of the whole train split; a
  subsample trains as many steps (``epochs / share``). ``partial``: a JSON
  file rewritten with the rows and runs so far after each share (a long
  run's results survive its interruption).
  """
  if not 0 < fraction < 1:
    raise ValueError(f"the budget fraction must be in (0, 1), got "
                     f"{fraction!r}: train-all planned for T sets T.")
  splits = task.load_splits(settings, None) if splits is None else splits
  pretrained = task.load_pretrained() if pretrained is None else pretrained
  start, load_at_start = time.perf_counter(), os.getloadavg()
  machine_at_start = machine()
  full_steps = round(settings.epochs
                     * (len(splits.train.labels) // settings.batch_size))
  rows, reports = [], []
  for share in train_fractions:
    train = stratified_subset(splits.train, share, seed=settings.split_seed)
    steps_per_epoch = len(train.labels) // settings.batch_size
    if steps_per_epoch < 1:
      raise ValueError(
          f"a train share of {share} keeps {len(train.labels)} examples, "
          f"less than one batch of {settings.batch_size}; keep a larger "
          "share.")
    methods, cell = regime_methods(task, settings, fast_sets, periods,
                                   fraction)
    cell = dataclasses.replace(cell, epochs=full_steps / steps_per_epoch)
    report = run_experiment(
        task, cell, splits=Splits(train, splits.validation, splits.test),
        methods=methods, pretrained=pretrained, test_budget_only=True)
    report["train_fraction"] = share
    reports.append(report)
    rows += cell_rows(report, fast_sets, periods, fraction, share)
    if partial is not None:
      partial.write_text(json.dumps(_json_safe(
          {"rows": rows, "runs": [r["methods"] for r in reports],
           "split_sizes": [r["split_sizes"] for r in reports],
           "load_average_at_start": load_at_start,
           "load_average_now": os.getloadavg(),
           "wall_seconds": time.perf_counter() - start}), indent=1))
  timings = step_times(task, settings, fast_sets, pretrained, splits,
                       timing_repeats)
  add_timings(rows, timings)
  return {"task": task.name, "fraction": fraction,
          "fast_sets": list(fast_sets), "periods": list(periods),
          "train_fractions": list(train_fractions),
          "T_steps": full_steps, "epochs_of_T": settings.epochs,
          "seeds": list(settings.seeds), "clock": settings.clock,
          "recipes": {"train_all": {"learning_rate": TRAIN_ALL_RATE},
                      **{f"multirate_{s} at k = {SELECTED_PERIOD}":
                         SELECTED_RATES[s] for s in fast_sets},
                      "slow rate at other k": "scaled by k / 5"},
          "machine_at_start": machine_at_start,
          "load_average_at_start": load_at_start,
          "load_average_at_end": os.getloadavg(),
          "wall_seconds": time.perf_counter() - start,
          "timings": timings, "rows": rows,
          "cells": [{"train_fraction": r["train_fraction"],
                     "description": r["description"],
                     "split_sizes": r["split_sizes"],
                     "settings": r["settings"],
                     "wall_seconds": r["wall_seconds"],
                     "machine_at_start": r["machine_at_start"],
                     "runs": r["methods"]} for r in reports]}


def format_map(result: Mapping[str, Any]) -> str:
  """The map as a text table, a row per cell."""
  f = f"{result['fraction']:g}"
  lines = [f"{'train':>5}  {'fast set':<10}  {'k':>2}  {'fast/full':>9}  "
           f"{'speed-up':>8}  {'realised':>8}  {'train-all ' + f + ' T':>15}"
           f"  {'multirate ' + f + ' T':>15}  {'difference':>13}  verdict"]
  for r in result["rows"]:
    lines.append(
        f"{r['train_examples']:>5}  {r['fast_set']:<10}  {r['period']:>2}  "
        f"{r['fast_over_full']:>9.2f}  {r['ideal_speedup']:>8.2f}  "
        f"{r['realised_speedup_mean']:>8.2f}  "
        f"{r['train_all_mean']:>7.1f} ± {r['train_all_half_width']:>4.1f}  "
        f"{r['multirate_mean']:>7.1f} ± {r['multirate_half_width']:>4.1f}  "
        f"{r['difference_mean']:>+6.1f} ± {r['difference_half_width']:>4.1f}"
        f"  {r['verdict']}")
  at_t = {r["train_examples"]: r["train_all_at_T_mean"]
          for r in result["rows"]}
  lines.append("train-all at T: " + ", ".join(
      f"{n} examples {a:.1f}" for n, a in at_t.items()))
  return "\n".join(lines)


def plot_map(result: Mapping[str, Any], title: str, path: Path) -> None:
  """Difference multirate - train-all at ``f T`` against the speed-up
  realised in the runs, a panel per share of the train split, a marker per
  fast set, labelled with k; 95% bars."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  shares = result["train_fractions"]
  figure, axes = plt.subplots(1, len(shares), figsize=(5 * len(shares), 4.2),
                              sharey=True, squeeze=False)
  markers = dict(zip(result["fast_sets"], "os^"))
  for axis, share in zip(axes[0], shares):
    rows = [r for r in result["rows"] if r["train_fraction"] == share]
    for fast_set in result["fast_sets"]:
      mine = [r for r in rows if r["fast_set"] == fast_set]
      x = [r["realised_speedup_mean"] for r in mine]
      axis.errorbar(x, [r["difference_mean"] for r in mine],
                    yerr=[r["difference_half_width"] for r in mine],
                    marker=markers[fast_set], linestyle="-", capsize=3,
                    label=f"fast = {fast_set}")
      for r, xi in zip(mine, x):
        axis.annotate(f"k={r['period']}", (xi, r["difference_mean"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    examples = rows[0]["train_examples"] if rows else "?"
    axis.set_title(f"{examples} train examples ({share:g} of the split)",
                   fontsize=9)
    axis.set_xlabel("speed-up realised in the runs (train-all s/step over "
                    "multirate's)")
    axis.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"multirate − train-all at {result['fraction']:g} T "
                        "(test points, 95%)")
  axes[0][0].legend(fontsize=8)
  figure.suptitle(title, fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _numbers(text: str, kind: type) -> tuple:
  return tuple(kind(x) for x in text.split(","))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.regime_map",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=("vision", "mnist"), default="vision")
  parser.add_argument("--quick", action="store_true",
                      help="one seed, k = 5, T = 1 epoch, fewer timing "
                      "repeats")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=float, default=4,
                      help="T: train-all's planned epochs of the whole "
                      "train split (the same steps on a subsample)")
  parser.add_argument("--fraction", type=float, default=BUDGET_FRACTION,
                      help="the budget B = fraction T (default 0.5)")
  parser.add_argument("--periods", help="comma-separated k (default 2,5,10; "
                      "quick 5)")
  parser.add_argument("--fast-sets", default=",".join(FAST_SETS),
                      help="comma-separated, of " + ", ".join(FAST_SETS))
  parser.add_argument("--train-fractions", default="0.25,1",
                      help="shares of the train split (stratified)")
  parser.add_argument("--image-size", type=int,
                      help="image side (default the task's, 32)")
  parser.add_argument("--evaluations", type=int,
                      help="validation points per run (default the budget "
                      "sweep's: 12 for vision and mnist)")
  parser.add_argument("--timing-repeats", type=int,
                      help="interleaved timing blocks (default 6; quick 2)")
  parser.add_argument("--clock", choices=("wall", "process"),
                      default="process")
  add_compilation_cache_arguments(parser)
  parser.add_argument("--out", type=Path, default=RESULTS)
  parser.add_argument("--name", help="the outputs' file name without "
                      "extension (default regime_map_<task>[_quick])")
  args = parser.parse_args(argv)
  enable_compilation_cache(compilation_cache_directory(args))
  task = TASKS[args.task]
  name = args.name or f"regime_map_{task.name}{'_quick' if args.quick else ''}"
  args.out.mkdir(parents=True, exist_ok=True)
  settings = dataclasses.replace(
      task.quick, epochs=1 if args.quick else args.epochs,
      seeds=tuple(range(1 if args.quick else args.seeds)), clock=args.clock,
      quick=args.quick, image_size=args.image_size or task.quick.image_size,
      evaluations=args.evaluations or EVALUATIONS[task.name])
  periods = (_numbers(args.periods, int) if args.periods
             else (SELECTED_PERIOD,) if args.quick else PERIODS)
  result = run_regime_map(
      task, settings, fast_sets=args.fast_sets.split(","), periods=periods,
      train_fractions=_numbers(args.train_fractions, float),
      fraction=args.fraction,
      timing_repeats=args.timing_repeats or (2 if args.quick else 6),
      partial=args.out / f"{name}.partial.json")
  (args.out / f"{name}.partial.json").unlink()
  result = {"command": " ".join(["python -m benchmarks.regime_map",
                                 *(sys.argv[1:] if argv is None else argv)]),
            **result}
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{name}.json").write_text(
      json.dumps(_json_safe(result), indent=1))
  plot_map(result, f"regime map, {task.name} ({task.model_name}), "
           f"{len(settings.seeds)} seed(s), {settings.image_size}px\n{name}",
           args.out / f"{name}.png")
  print(format_map(result))
  timings = result["timings"]
  print("step seconds (probe, medians): train-all "
        f"{timings['train_all']:.4f}; " + "; ".join(
            f"{s} full {timings[s]['full']:.4f} fast {timings[s]['fast']:.4f}"
            for s in result["fast_sets"]))
  load = result["load_average_at_start"], result["load_average_at_end"]
  print(f"total {result['wall_seconds']:.0f} s; load averages "
        f"{'/'.join(f'{x:.1f}' for x in load[0])} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in load[1])} at the end; wrote "
        f"{args.out / (name + '.json')} and .png")
  return result


if __name__ == "__main__":
  main()
