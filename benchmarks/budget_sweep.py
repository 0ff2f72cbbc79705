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

The text task's full sweep uses every text (the time protocol's full
split sizes); ``--quick`` its quick subset.

JAX's persistent compilation cache is on (``--compilation-cache DIR``,
default ``~/.cache/multirate_optax/jax``; ``--no-compilation-cache`` turns it
off): the variants of one method compile the same programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import jax

from experiments.finetune.experiment import run_experiment
from experiments.finetune.recipes import run_recipe_sweep
from experiments.finetune.reporting import _json_safe
from experiments.finetune.sweep import (
    FRACTIONS, base_and_fraction, budget_variants, format_recipes,
    format_sweep, plot_sweep, sweep_report)
from experiments.finetune.tasks import TASKS

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "multirate_optax" / "jax"
# The methods swept, per task: train-all, the baselines of the targets and
# the multirate variants among which validation chooses.
SWEPT = {
    "vision": ("train_all", "multirate_classifier", "multirate_last_stage",
               "train_last_stage", "train_classifier"),
    "mnist": ("train_all", "multirate_classifier", "multirate_last_stage",
              "train_last_stage", "train_classifier"),
    "text": ("train_all", "multirate_head", "train_head"),
}


def enable_compilation_cache(directory: Optional[Path]) -> None:
  """JAX's persistent compilation cache in ``directory`` (``None``: off)."""
  if directory is None:
    return
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _split_sizes(task, quick: bool, validation_size: Optional[int]):
  sizes = (task.quick if quick else task.full).split_sizes
  if validation_size is None:
    return sizes
  if task.name != "text":
    raise ValueError(f"--validation-size is for the text task, not "
                     f"{task.name!r}.")
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
                      help="validation points per run (default the task's "
                      "quick settings': vision 12, text 8)")
  parser.add_argument("--methods", help="comma-separated (default: the "
                      "task's swept methods)")
  parser.add_argument("--grid", action="store_true",
                      help="a recipe per family and budget, chosen on "
                      "validation from grids of equal size")
  parser.add_argument("--fractions", help="comma-separated budget fractions "
                      "of T (default 0.125,0.25,0.5,1; quick 0.5,1)")
  parser.add_argument("--validation-size", type=int,
                      help="text: at most this many validation texts (the "
                      "test split stays whole), to cut evaluation cost")
  parser.add_argument("--clock", choices=("wall", "process"),
                      default="process")
  parser.add_argument("--compilation-cache", type=Path, default=DEFAULT_CACHE)
  parser.add_argument("--no-compilation-cache", action="store_true")
  parser.add_argument("--out", type=Path, default=RESULTS)
  parser.add_argument("--name", help="the outputs' file name without "
                      "extension (default budget_sweep_<task>[_grid][_quick])")
  args = parser.parse_args(argv)
  enable_compilation_cache(
      None if args.no_compilation_cache else args.compilation_cache)
  task = TASKS[args.task]
  fractions = (tuple(float(f) for f in args.fractions.split(","))
               if args.fractions else (0.5, 1.0) if args.quick else FRACTIONS)
  settings = dataclasses.replace(
      task.quick, epochs=1 if args.quick else args.epochs,
      seeds=tuple(range(1 if args.quick else args.seeds)), clock=args.clock,
      split_sizes=_split_sizes(task, args.quick, args.validation_size),
      evaluations=args.evaluations or task.quick.evaluations)
  if args.grid:
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
    methods, settings = budget_variants(task.methods_in(settings), settings,
                                        fractions)
    if 1 not in fractions:  # Train-all planned for T still sets T.
      methods += [m for m in task.methods_in(settings) if m.train_all]
    report = run_experiment(task, settings, methods=methods,
                            test_budget_only=True)
    recipes = ("one rate per method, the time protocol's selection on "
               "validation (QUICK_GRIDS); no per-budget grid")
  # Issue 19's methods: the timetables, LLRD and their combinations; the
  # two-rate multirate baselines are those without LLRD (multirate with
  # LLRD is a combination, compared with them, not one of them).
  timetables = [m.name for m in task.methods
                if m.timetable is not None or m.layerwise_decay is not None]
  two_rate = sorted({base_and_fraction(r)[0] for r in report["methods"]
                     if r["multirate"]} - set(timetables))
  sweep = sweep_report(report, multirate=two_rate, timetables=timetables)
  name = args.name or (f"budget_sweep_{task.name}"
                       f"{'_grid' if args.grid else ''}"
                       f"{'_quick' if args.quick else ''}")
  args.out.mkdir(parents=True, exist_ok=True)
  output = {"command": " ".join(["python -m benchmarks.budget_sweep",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "description": report["description"],
            "machine_at_start": report["machine_at_start"],
            "load_average_at_end": report["load_average_at_end"],
            "wall_seconds": report["wall_seconds"],
            "split_sizes": report["split_sizes"],
            "epochs_of_T": settings.epochs, "fractions": fractions,
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
  return output


if __name__ == "__main__":
  main()
