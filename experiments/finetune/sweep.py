"""The budget sweep: every method planned for every budget, with intervals.

The time protocol of :mod:`experiments.finetune.budget` gives each method one
run planned for train-all's time ``T`` and reads it at earlier budgets; a
method that is still at a high rate at ``T/2`` looks worse there than a run a
user with budget ``T/2`` would make. Here each method gets, for each fraction
``f`` of ``T``, a run planned for ``f T`` (:func:`budget_variants`: its steps
from its measured speed, its rates decaying to zero over those steps,
:class:`experiments.finetune.settings.Method` ``budget_fraction``); its
accuracy at ``f`` is the checkpoint chosen on validation within ``f T``.
Train-all at ``f = 1`` is the baseline that sets ``T`` on each seed.

Intervals (:func:`interval`): the mean test accuracy over seeds, with a 95%
half-width combining the spread over seeds (Student's t on the per-seed
accuracies) and the binomial sampling error of a test split of ``n``
examples (``1.96 sqrt(p (1 - p) / n)``), added in quadrature: the seeds
share one test split, so its sampling error does not average out over them.
A difference between two methods (:func:`difference`) is paired by seed and,
where the runs kept which test examples they got right (``test_correct``),
by test example: the t-interval of the per-seed differences, and in
quadrature the sampling error over the test split of the mean of each
example's difference ``D_i`` (averaged over seeds; the examples' variance
component of a seeds-by-examples decomposition, so that the per-seed noise
is not counted twice), to which only the examples on which the two methods
disagree contribute. Records made before the runs kept their
examples fall back to adding both methods' binomial terms, which overstates
the test-split error of a paired comparison (conservative); each target says
which was used. Verdicts: ``met`` when the interval lies on the target's
side, ``missed`` when it lies on the other, ``not resolved`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from scipy import stats

from experiments.finetune.budget import at_budget, unpack_correct
from experiments.finetune.settings import Method, Settings

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
_SEPARATOR = "@"


def variant_name(method: Method, fraction: float) -> str:
  """The name of ``method`` planned for ``fraction`` of ``T``.

  Example:
    >>> variant_name(Method("train_all", "train all"), 0.25)
    'train_all@0.25'
  """
  return f"{method.name}{_SEPARATOR}{fraction:g}"


def budget_variants(methods: Sequence[Method], settings: Settings,
                    fractions: Sequence[float] = FRACTIONS
                    ) -> tuple[list[Method], Settings]:
  """Every method planned for every fraction, and settings whose grids name
  them (each variant's grid is its method's: grids of the same size for
  every budget).

  Train-all at ``f = 1`` keeps its name: it is the run that sets ``T``.

  Example:
    >>> from experiments.finetune.tasks import VISION
    >>> methods = [m for m in VISION.methods if m.name == "train_all"]
    >>> variants, settings = budget_variants(methods, VISION.quick, (0.5, 1))
    >>> [(m.name, m.budget_fraction, m.train_all) for m in variants]
    [('train_all@0.5', 0.5, False), ('train_all', 1, True)]
    >>> settings.grids['train_all@0.5'] == settings.grids['train_all']
    True
  """
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"fractions must be in (0, 1], got {fractions!r}.")
  variants, grids = [], dict(settings.grids)
  for method in methods:
    for fraction in fractions:
      name = (method.name if method.train_all and fraction == 1
              else variant_name(method, fraction))
      variants.append(dataclasses.replace(
          method, name=name, budget_fraction=fraction,
          label=f"{method.label}, planned for {fraction:g} T"))
      grids[name] = settings.grids[method.name]
  return variants, dataclasses.replace(settings, grids=grids)


def base_and_fraction(result: Mapping[str, Any]) -> tuple[str, float]:
  """A variant's method name and budget fraction, from its result's name."""
  name = result["name"]
  if _SEPARATOR not in name:
    return name, 1.0
  base, fraction = name.rsplit(_SEPARATOR, 1)
  return base, float(fraction)


def interval(accuracies: Sequence[float], test_size: int,
             level: float = 0.95) -> tuple[float, float]:
  """Mean and 95% half-width, in points, of per-seed test accuracies (0-1).

  Example:
    >>> mean, half = interval([0.9, 0.92, 0.94], test_size=1000)
    >>> round(mean, 2), round(half, 2)  # hypot(4.303 * 2 / sqrt(3), 1.68)
    (92.0, 5.25)
  """
  values = 100 * np.asarray(accuracies, float)
  mean = float(values.mean())
  seeds = len(values)
  seed_half = (stats.t.ppf(0.5 + level / 2, seeds - 1)
               * values.std(ddof=1) / math.sqrt(seeds) if seeds > 1 else 0.0)
  p = mean / 100
  test_half = (stats.norm.ppf(0.5 + level / 2)
               * 100 * math.sqrt(p * (1 - p) / test_size))
  return mean, float(math.hypot(seed_half, test_half))


def difference(first: Sequence[float], second: Sequence[float],
               test_size: int, level: float = 0.95,
               first_correct: Optional[Sequence[np.ndarray]] = None,
               second_correct: Optional[Sequence[np.ndarray]] = None
               ) -> tuple[float, float]:
  """Mean and 95% half-width, in points, of ``first - second``, paired by seed.

  With ``first_correct`` and ``second_correct`` (per seed, which of the
  ``test_size`` test examples each run classified correctly) the test-split
  term is paired by example too: ``z sqrt((var(D) - s2 / S) / n)``, ``D``
  the per-example differences averaged over the ``S`` seeds and ``s2`` the
  seed-by-example residual variance (a two-way decomposition; the seed term
  already holds that noise, which one seed cannot separate: there the term
  is ``z sd(D) / sqrt(n)``, McNemar's); without them, both methods' binomial
  terms are added (conservative).

  Example:
    >>> mean, half = difference([0.9, 0.9], [0.9, 0.9], test_size=10**9)
    >>> mean, round(half, 3)
    (0.0, 0.003)
    >>> a = [np.array([1, 1, 1, 0] * 250, bool)] * 2  # 75%, both seeds
    >>> b = [np.array([1, 1, 0, 0] * 250, bool)] * 2  # 50%: 1 in 4 differs
    >>> mean, half = difference([.75, .75], [.5, .5], 1000, first_correct=a,
    ...                         second_correct=b)
    >>> round(mean, 1), round(half, 2)  # 1.96 * 100 * sd([1, 0, 0, 0] * 250) / sqrt(1000)
    (25.0, 2.69)
  """
  a, b = (100 * np.asarray(x, float) for x in (first, second))
  if a.shape != b.shape:
    raise ValueError(f"paired by seed: {a.shape} against {b.shape}.")
  diffs = a - b
  seeds = len(diffs)
  seed_half = (stats.t.ppf(0.5 + level / 2, seeds - 1)
               * diffs.std(ddof=1) / math.sqrt(seeds) if seeds > 1 else 0.0)
  z = stats.norm.ppf(0.5 + level / 2)
  if first_correct is not None and second_correct is not None:
    hits = [np.asarray(np.stack(c), float)
            for c in (first_correct, second_correct)]
    if hits[0].shape != (seeds, test_size) or hits[1].shape != hits[0].shape:
      raise ValueError(
          f"per-example records of shapes {hits[0].shape} and "
          f"{hits[1].shape}, expected ({seeds}, {test_size}): one per seed "
          "and test example.")
    # Seeds x examples: the examples' variance component of the grand mean,
    # without the seed-by-example noise the seed term already counts
    # (two-way decomposition: mean squares of examples less the residual's).
    cells = hits[0] - hits[1]
    per_example = cells.mean(axis=0)
    residual = (cells - cells.mean(axis=1, keepdims=True) - per_example
                + cells.mean())
    noise = (np.sum(residual ** 2) / ((seeds - 1) * (test_size - 1))
             if seeds > 1 else 0.0)
    test_half = z * 100 * math.sqrt(
        max(per_example.var(ddof=1) - noise / seeds, 0.0) / test_size)
  else:
    test_half = z * 100 * math.sqrt(sum(
        (m / 100) * (1 - m / 100) for m in (a.mean(), b.mean())) / test_size)
  return float(diffs.mean()), float(math.hypot(seed_half, test_half))


def verdict(mean: float, half: float, threshold: float = 0.0) -> str:
  """``'met'`` if the interval lies at or above ``threshold``, ``'missed'``
  if below it, else ``'not resolved'``.

  Example:
    >>> verdict(1.0, 0.5), verdict(-1.0, 0.5), verdict(0.2, 0.5)
    ('met', 'missed', 'not resolved')
  """
  if mean - half >= threshold:
    return "met"
  if mean + half < threshold:
    return "missed"
  return "not resolved"


def sweep_table(results: Sequence[Mapping[str, Any]],
                test_size: int) -> dict[str, dict[str, dict[str, Any]]]:
  """Per method and fraction: per-seed test and validation accuracy at
  ``f T`` of the run planned for ``f T``, and the test interval."""
  budgets = {run["seed"]: run["train_seconds"]
             for result in results if result.get("train_all")
             for run in result["runs"]}
  table: dict[str, dict[str, dict[str, Any]]] = {}
  for result in results:
    base, fraction = base_and_fraction(result)
    chosen = [at_budget(run["points"], fraction * budgets[run["seed"]])
              for run in result["runs"]]
    test = [c["test_accuracy"] for c in chosen]
    mean, half = interval(test, test_size)
    table.setdefault(base, {})[f"{fraction:g}"] = {
        "rates": result["rates"], "recipe": result.get("recipe"),
        "seeds": [r["seed"] for r in result["runs"]],
        "test": test, "validation": [c["validation_accuracy"] for c in chosen],
        "test_correct": [c["test_correct"] for c in chosen],
        "test_mean": mean, "test_half_width": half,
        "validation_mean": 100 * float(np.mean(
            [c["validation_accuracy"] for c in chosen])),
        "epochs": [r["epochs"] for r in result["runs"]],
    }
  return table


def compared(row: Mapping[str, Any], other: Mapping[str, Any],
             test_size: int, threshold: float,
             target: Mapping[str, Any]) -> dict[str, Any]:
  """``target`` with the difference of two table cells (``row`` − ``other``,
  paired by seed, and by test example where both kept theirs), its verdict
  against ``threshold`` and which pairing was used.

  Example:
    >>> cell = {"test": [0.8, 0.9], "test_correct": [None, None]}
    >>> compared(cell, cell, 100, 0.0, {"target": "equal"})["pairing"]
    'seeds (binomial terms added)'
  """
  packed = [row.get("test_correct") or [], other.get("test_correct") or []]
  by_example = all(p and all(c is not None for c in p) for p in packed)
  hits = ([[unpack_correct(c, test_size) for c in p] for p in packed]
          if by_example else [None, None])
  mean, half = difference(row["test"], other["test"], test_size,
                          first_correct=hits[0], second_correct=hits[1])
  return {**target, "difference_mean": mean, "difference_half_width": half,
          "verdict": verdict(mean, half, threshold),
          "pairing": ("seeds and test examples" if by_example
                      else "seeds (binomial terms added)")}


def check_sweep_targets(table: Mapping[str, Mapping[str, Mapping[str, Any]]],
                        test_size: int, multirate: Sequence[str],
                        timetables: Sequence[str] = ()) -> list[dict[str, Any]]:
  """The issue's targets, with the multirate variant chosen on validation at
  each budget; at ``T/4`` against every baseline, which ``timetables``
  (issue 19's methods, compared by :func:`check_timetable_targets`) are
  not."""

  def best_multirate(fraction: str) -> Optional[str]:
    swept = [name for name in multirate if fraction in table.get(name, {})]
    return max(swept, key=lambda name: table[name][fraction][
        "validation_mean"]) if swept else None

  def compare(name: str, fraction: str, other: str, other_fraction: str,
              threshold: float, what: str) -> dict[str, Any]:
    return compared(table[name][fraction], table[other][other_fraction],
                    test_size, threshold,
                    {"target": what, "multirate": name, "against": other})

  rows = []
  if "0.5" in table.get("train_all", {}) and best_multirate("0.5"):
    chosen = best_multirate("0.5")
    rows.append(compare(chosen, "0.5", "train_all", "0.5", 0.0,
                        "at T/2, multirate >= train-all planned for T/2"))
    rows.append(compare(chosen, "0.5", "train_all", "1", -0.5,
                        "at T/2, multirate within 0.5 points of train-all "
                        "at T"))
  if "0.25" in table.get("train_all", {}) and best_multirate("0.25"):
    chosen = best_multirate("0.25")
    for other in table:
      if (other not in multirate and other not in timetables
          and "0.25" in table[other]):
        rows.append(compare(chosen, "0.25", other, "0.25", 0.0,
                            f"at T/4, multirate ahead of {other} planned "
                            "for T/4"))
  return rows


def check_timetable_targets(
    table: Mapping[str, Mapping[str, Mapping[str, Any]]], test_size: int,
    multirate: Sequence[str], timetables: Sequence[str],
    fraction: str = "0.5") -> list[dict[str, Any]]:
  """Issue 19's target: each new timetable at ``fraction`` T against the
  two-rate multirate variant chosen on validation at that budget."""
  multirate = [name for name in multirate if fraction in table.get(name, {})]
  if not multirate:
    return []
  best = max(multirate, key=lambda name: table[name][fraction][
      "validation_mean"])
  rows = []
  for name in timetables:
    if fraction not in table.get(name, {}):
      continue
    rows.append(compared(
        table[name][fraction], table[best][fraction], test_size, 0.0,
        {"target": f"at {fraction} T, {name} >= the best two-rate "
                   f"multirate (on validation) at {fraction} T",
         "multirate": name, "against": best}))
  return rows


def format_sweep(table: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 targets: Sequence[Mapping[str, Any]]) -> str:
  """The sweep as a text table: mean ± 95% half-width per budget."""
  fractions = sorted({f for rows in table.values() for f in rows}, key=float)
  width = max(len(name) for name in table)
  lines = [f"{'method':<{width}}  " + "  ".join(
      f"{'B = ' + f + ' T':>14}" for f in fractions)]
  for name, rows in table.items():
    cells = [f"{rows[f]['test_mean']:6.2f} ± {rows[f]['test_half_width']:4.2f}"
             if f in rows else " " * 14 for f in fractions]
    lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
  lines.append("")
  for target in targets:
    lines.append(
        f"{target['target']} ({target['multirate']}): "
        f"{target['difference_mean']:+.2f} ± "
        f"{target['difference_half_width']:.2f} points: {target['verdict']}"
        + (f" (paired by {target['pairing']})" if "pairing" in target
           else ""))
  return "\n".join(lines)


def format_recipes(table: Mapping[str, Mapping[str, Mapping[str, Any]]]
                   ) -> str:
  """Which recipe won each family's grid at each budget (a recipe sweep,
  :mod:`experiments.finetune.recipes`); empty for a plain sweep.

  Example:
    >>> row = {"recipe": {"short": "train_all h=0.01"}}
    >>> print(format_recipes({"train_all": {"0.5": row}}))
    train_all at 0.5 T: train_all h=0.01
  """
  return "\n".join(
      f"{name} at {fraction} T: {row['recipe']['short']}"
      for name, rows in table.items()
      for fraction, row in sorted(rows.items(), key=lambda kv: float(kv[0]))
      if row.get("recipe"))


def plot_sweep(table: Mapping[str, Mapping[str, Mapping[str, Any]]],
               title: str, path: Any) -> None:
  """Test accuracy against the training budget, one line per method, with
  its 95% band."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for name, rows in table.items():
    fractions = sorted(rows, key=float)
    x = [float(f) for f in fractions]
    mean = np.array([rows[f]["test_mean"] for f in fractions])
    half = np.array([rows[f]["test_half_width"] for f in fractions])
    (line,) = axes.plot(x, mean, marker="o", label=name)
    axes.fill_between(x, mean - half, mean + half, alpha=0.15,
                      color=line.get_color())
  axes.set_xscale("log", base=2)
  axes.set_xlabel("training budget, fraction of train-all's time T")
  axes.set_ylabel("test accuracy (%), each run planned for its budget")
  axes.set_title(title, fontsize=9)
  axes.legend(fontsize=8)
  axes.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def sweep_report(report: Mapping[str, Any],
                 multirate: Optional[Sequence[str]] = None,
                 timetables: Sequence[str] = ()) -> dict[str, Any]:
  """The sweep's table and targets from :func:`run_experiment`'s report
  (with ``timetables``, the names of issue 19's methods, also theirs:
  :func:`check_timetable_targets`)."""
  test_size = report["split_sizes"]["test"]
  table = sweep_table(report["methods"], test_size)
  if multirate is None:
    multirate = sorted({base_and_fraction(r)[0] for r in report["methods"]
                        if r["multirate"]})
  return {"table": table,
          "targets": check_sweep_targets(table, test_size, multirate,
                                         timetables)
                     + check_timetable_targets(table, test_size, multirate,
                                               timetables),
          "interval": "95%: t over seeds (+) binomial test-split error, "
                      "in quadrature; differences paired by seed and, where "
                      "the runs kept them, by test example (each target's "
                      "'pairing')"}
