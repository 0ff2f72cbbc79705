"""The budget sweep: accuracy at every training budget, each run planned for it.

Run from the repository root::

  python -m benchmarks.budget_sweep                 # vision, 3 seeds
  python -m benchmarks.budget_sweep --quick         # one seed, two budgets
  python -m benchmarks.budget_sweep --grid          # a recipe per budget

For each method and each budget ``B = f T`` (``f`` in 1/8, 1/4, 1/2, 1; ``T``
train-all's training time on the seed), one run planned for ``B``; the table
gives the test accuracy of the checkpoint chosen on validation within ``B``,
mean over seeds with a 95% interval (:mod:`experiments.finetune.sweep`), and
the verdicts of the targets. Prints the table, writes
``benchmarks/results/budget_sweep_<task>[_grid][_quick].json`` and ``.png``.

``--grid``: each family (train-all, multirate, each baseline) chooses its
recipe at each budget on validation from a grid of the same size for every
family (the task's ``recipes``, :mod:`experiments.finetune.recipes`; for
multirate the grid spans the fast set, drift and k); the table says which
recipe won where. Without it, one recipe per method (the time protocol's
selection) at every budget.

The text tasks' (text, trec) full sweep uses every text (the time protocol's full
split sizes); ``--quick`` its quick subset.

Text batches are cut to the shortest multiple of 8 tokens that fits their
longest text (the same texts per batch; ``--no-bucketing``: all padded to
the maximum, :mod:`experiments.finetune.tasks.text`).

JAX's persistent compilation cache is on (``--compilation-cache DIR``,
default ``~/.cache/multirate_optax/jax``; ``--no-compilation-cache`` turns it
off; :mod:`experiments.compilation_cache`): the variants of one method compile
the same programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from experiments.compilation_cache import (
    add_compilation_cache_arguments, compilation_cache_directory,
    enable_compilation_cache)
from experiments.finetune.experiment import run_experiment
from experiments.finetune.recipes import run_recipe_sweep
from experiments.finetune.reporting import _json_safe
from experiments.finetune.sweep import (
    FRACTIONS, base_and_fraction, budget_variants, check_timetable_targets,
    format_recipes, format_sweep, plot_sweep, sweep_report)
from experiments.finetune.tasks import TASKS

RESULTS = Path(__file__).resolve().parent / "results"
# Validation points per run unless --evaluations says otherwise (the
# sweeps in docs/benchmarks/budget_sweep.md ran with these).
EVALUATIONS = {"vision": 12, "mnist": 12, "text": 8, "trec": 8}
# The methods swept, per task: train-all, the baselines of the targets and
# the multirate variants among which validation chooses.
SWEPT = {
    "vision": ("train_all", "multirate_classifier", "multirate_last_stage",
               "train_last_stage", "train_classifier"),
    "mnist": ("train_all", "multirate_classifier", "multirate_last_stage",
              "train_last_stage", "train_classifier"),
    "text": ("train_all", "multirate_head", "train_head"),
    "trec": ("train_all", "multirate_head", "train_head"),
}
# The tasks whose validation split --validation-size may cut.
TEXT_TASKS = ("text", "trec")


def method_fractions(specs: Sequence[str],
                     names: Sequence[str]) -> dict[str, tuple[float, ...]]:
  """``--method-fractions`` values, ``METHOD=F,F``, as ``{method: fractions}``.

  Example:
    >>> method_fractions(["b=0.5,1"], ["a", "b"])
    {'b': (0.5, 1.0)}
  """
  own = {}
  for spec in specs:
    name, sep, values = spec.partition("=")
    if not sep or name not in names:
      raise ValueError(
          f"--method-fractions {spec!r}: expected METHOD=F,F with METHOD one "
          f"of the swept methods {list(names)}; name the method in --methods "
          "first.")
    own[name] = tuple(float(f) for f in values.split(","))
  return own


def _issue_19(method) -> bool:
  """Issue 19's methods: the timetables, LLRD and their combinations."""
  return method.timetable is not None or method.layerwise_decay is not None


def complete_budgets(results: Sequence[dict], task) -> list[dict]:
  """The results of a stopped sweep without the budgets that train-all or a
  two-rate multirate baseline swept lacks (train-all at ``T`` is kept: it
  sets ``T``), so that every target compares runs that exist."""
  baselines = {m.name for m in task.methods
               if m.train_all or (m.multirate and not _issue_19(m))}
  fractions: dict[str, set[float]] = {}
  for result in results:
    base, fraction = base_and_fraction(result)
    fractions.setdefault(base, set()).add(fraction)
  present = [fractions[b] for b in baselines if b in fractions]
  kept = set.intersection(*present) if present else set()
  return [r for r in results
          if r.get("train_all") or base_and_fraction(r)[1] in kept]


def _split_sizes(task, quick: bool, validation_size: Optional[int]):
  sizes = (task.quick if quick else task.full).split_sizes
  if validation_size is None:
    return sizes
  if task.name not in TEXT_TASKS:
    raise ValueError(f"--validation-size is for the text tasks "
                     f"{list(TEXT_TASKS)}, not {task.name!r}.")
  train, _, test = sizes or (None, None, None)
  return (train, validation_size, test)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.budget_sweep",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=tuple(TASKS), default="vision")
  parser.add_argument("--quick", action="store_true",
                      help="one seed, budgets T/2 and T, two methods")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=float, default=4,
                      help="train-all's planned epochs (T; a fraction of one "
                      "allowed); the vision task converges by about 6 of the "
                      "20 epochs of the time protocol's full run")
  parser.add_argument("--evaluations", type=int,
                      help="validation points per run (default vision and "
                      "mnist 12, text and trec 8)")
  parser.add_argument("--methods", help="comma-separated (default: the "
                      "task's swept methods)")
  parser.add_argument("--grid", action="store_true",
                      help="a recipe per family and budget, chosen on "
                      "validation from grids of equal size")
  parser.add_argument("--fractions", help="comma-separated budget fractions "
                      "of T (default 0.125,0.25,0.5,1; quick 0.5,1)")
  parser.add_argument("--method-fractions", action="append", default=[],
                      metavar="METHOD=F,F", help="one method's budget "
                      "fractions instead of --fractions' (repeatable), e.g. "
                      "to drop a budget for some methods")
  parser.add_argument("--budget-major", action="store_true",
                      help="run every method at the first of --fractions, "
                      "then every method at the next, ... (methods in "
                      "--methods order): a run stopped early keeps whole "
                      "budgets")
  parser.add_argument("--from-partial", type=Path, metavar="JSON",
                      help="no training: the outputs of a stopped run from "
                      "its <name>.partial.json (written after each method), "
                      "budgets that train-all or a two-rate baseline lacks "
                      "left out")
  parser.add_argument("--validation-size", type=int,
                      help="text: at most this many validation texts (the "
                      "test split stays whole), to cut evaluation cost")
  parser.add_argument("--clock", choices=("wall", "process"),
                      default="process")
  parser.add_argument("--no-bucketing", action="store_true",
                      help="text: every batch padded to the maximum length "
                      "(default: cut to the shortest multiple of 8 tokens "
                      "that fits its longest text)")
  add_compilation_cache_arguments(parser)
  parser.add_argument("--out", type=Path, default=RESULTS)
  parser.add_argument("--name", help="the outputs' file name without "
                      "extension (default budget_sweep_<task>[_grid][_quick])")
  args = parser.parse_args(argv)
  enable_compilation_cache(compilation_cache_directory(args))
  task = TASKS[args.task]
  fractions = (tuple(float(f) for f in args.fractions.split(","))
               if args.fractions else (0.5, 1.0) if args.quick else FRACTIONS)
  settings = dataclasses.replace(
      task.quick, epochs=1 if args.quick else args.epochs,
      seeds=tuple(range(1 if args.quick else args.seeds)), clock=args.clock,
      split_sizes=_split_sizes(task, args.quick, args.validation_size),
      evaluations=args.evaluations or EVALUATIONS[task.name],
      bucketing=not args.no_bucketing)
  if args.grid and (args.budget_major or args.method_fractions
                    or args.from_partial):
    parser.error("--budget-major, --method-fractions and --from-partial are "
                 "for a sweep of methods, not with --grid.")
  if args.from_partial and not args.name:  # Not over the finished sweep's.
    args.name = args.from_partial.name.removesuffix(".json").removesuffix(
        ".partial")
  name = args.name or (f"budget_sweep_{task.name}"
                       f"{'_grid' if args.grid else ''}"
                       f"{'_quick' if args.quick else ''}")
  args.out.mkdir(parents=True, exist_ok=True)
  partial = args.out / f"{name}.partial.json"
  command = " ".join(["python -m benchmarks.budget_sweep",
                      *(sys.argv[1:] if argv is None else argv)])
  if args.from_partial:
    saved = json.loads(args.from_partial.read_text())
    report, command = saved["report"], saved["command"]
    settings = dataclasses.replace(settings, epochs=saved["epochs_of_T"])
    fractions, recipes = tuple(saved["fractions"]), saved["recipes"]
    report["methods"] = complete_budgets(report["methods"], task)
    extra = {"stopped_early": f"from {args.from_partial.name}: the methods "
                              "finished before the run was stopped",
             **({"method_fractions": saved["method_fractions"]}
                if "method_fractions" in saved else {})}
  elif args.grid:
    grids = task.recipes
    if args.methods:
      grids = {family: grids[family] for family in args.methods.split(",")}
    elif args.quick:
      grids = {family: grids[family] for family in list(grids)[:2]}
    report = run_recipe_sweep(task, settings, grids, fractions)
    recipes = ("per family and budget, chosen on validation from grids of "
               f"{len(next(iter(grids.values())))} members (recipe_grids)")
  else:
    names = (args.methods.split(",") if args.methods else
             SWEPT[args.task][:2] if args.quick else SWEPT[args.task])
    settings = dataclasses.replace(settings, methods=tuple(names))
    own = method_fractions(args.method_fractions, names)
    methods, grids = [], {}
    for method in task.methods_in(settings):
      variants, planned = budget_variants(
          [method], settings, own.get(method.name, fractions))
      methods += variants
      grids.update(planned.grids)
    settings = dataclasses.replace(settings, grids=grids)
    if not any(m.train_all for m in methods):  # Train-all for T sets T.
      methods += [m for m in task.methods_in(settings) if m.train_all]
    if args.budget_major:
      order = list(dict.fromkeys(  # 1.0: train-all for T, if not swept.
          [*fractions, *(f for fs in own.values() for f in fs), 1.0]))
      methods.sort(key=lambda m: (order.index(m.budget_fraction),
                                  names.index(m.name.split("@")[0])))
    recipes = ("one rate per method, the time protocol's selection on "
               "validation (QUICK_GRIDS); no per-budget grid")
    extra = ({"method_fractions": own} if own else {})

    def save_partial(report):
      partial.write_text(json.dumps(_json_safe(
          {"command": command, "epochs_of_T": settings.epochs,
           "fractions": fractions, "recipes": recipes, **extra,
           "report": report}), indent=1))

    report = run_experiment(task, settings, methods=methods,
                            test_budget_only=True, on_method=save_partial)
  # Issue 19's methods: the timetables, LLRD and their combinations; the
  # two-rate multirate baselines are those without LLRD (multirate with
  # LLRD is a combination, compared with them, not one of them).
  timetables = [m.name for m in task.methods if _issue_19(m)]
  two_rate = sorted({base_and_fraction(r)[0] for r in report["methods"]
                     if r["multirate"]} - set(timetables))
  sweep = sweep_report(report, multirate=two_rate, timetables=timetables)
  # Issue 19's target is at T/2 (in sweep_report); the same comparison at
  # every other budget swept.
  for fraction in sorted({f for rows in sweep["table"].values()
                          for f in rows} - {"0.5"}, key=float):
    sweep["targets"] += check_timetable_targets(
        sweep["table"], report["split_sizes"]["test"], two_rate, timetables,
        fraction=fraction)
  output = {"command": command,
            "description": report["description"],
            "machine_at_start": report["machine_at_start"],
            "load_average_at_end": report["load_average_at_end"],
            "wall_seconds": report["wall_seconds"],
            "split_sizes": report["split_sizes"],
            "epochs_of_T": settings.epochs, "fractions": fractions,
            **(extra if not args.grid else {}),
            "recipes": recipes,
            **({"recipe_grids": report["recipe_grids"]} if args.grid else {}),
            **sweep, "runs": report["methods"]}
  (args.out / f"{name}.json").write_text(
      json.dumps(_json_safe(output), indent=1))
  plot_sweep(sweep["table"], f"{report['description']}\n{name}",
             args.out / f"{name}.png")
  print(format_sweep(sweep["table"], sweep["targets"]))
  if args.grid:
    print("\nrecipes chosen on validation:\n" + format_recipes(sweep["table"]))
  print(f"total {report['wall_seconds']:.0f} s; wrote "
        f"{args.out / (name + '.json')} and .png")
  if not args.from_partial:
    partial.unlink(missing_ok=True)
  return output


if __name__ == "__main__":
  main()
