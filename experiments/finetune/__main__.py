"""The fine-tuning experiment's command line.

Run from the repository root::

  python -m experiments.finetune                # quick vision run (4 methods)
  python -m experiments.finetune --full         # the vision experiment
  python -m experiments.finetune --task text    # quick text run
  python -m experiments.finetune --task text --full
  python -m experiments.finetune --task trec    # quick run, TREC questions
  python -m experiments.finetune --data my_images.npz          # your images
  python -m experiments.finetune --task text --data mine.csv   # your texts

``--data`` takes, for ``vision``, an ``.npz`` file of ``images`` (n, height,
width, 3), ImageNet-normalised, and ``labels`` (n,); for ``text``, a UTF-8
CSV file with a header and the columns ``text`` and ``label``. Either is split
into train/validation/test like the default data.

JAX's persistent compilation cache is on, in ``~/.cache/multirate_optax/jax``
(``--compilation-cache DIR`` elsewhere, ``--no-compilation-cache`` off;
:mod:`experiments.compilation_cache`): a second run loads its compiled
programs instead of compiling them. Training times exclude compilation either
way.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from experiments.compilation_cache import (
    add_compilation_cache_arguments, compilation_cache_directory,
    enable_compilation_cache)
from experiments.finetune.experiment import run_experiment
from experiments.finetune.reporting import format_table, write_outputs
from experiments.finetune.settings import Settings
from experiments.finetune.tasks import TASKS, Task


def parse_args(
    argv: Optional[Sequence[str]] = None,
) -> tuple[Task, Settings, Path, Optional[Path], Optional[Path]]:
  """The task, its settings, the output directory, the data file
  (``None``: the task's own data) and the compilation cache's directory
  (``None``: off)."""
  parser = argparse.ArgumentParser(
      prog="python -m experiments.finetune",
      description="Fine-tune a pretrained network, multirate training against "
      "every baseline, accuracy against training time: EfficientNet-Lite0 on "
      "the digits (vision) or all-MiniLM-L6-v2 on Rotten Tomatoes (text).")
  parser.add_argument("--task", choices=tuple(TASKS), default="vision",
                      help="vision (default), mnist, text or trec")
  parser.add_argument("--full", action="store_true",
                      help="the full experiment: 3 seeds, every method, "
                      "rates selected on validation, more epochs and data; "
                      "default is a quick run (one seed, fixed rates; vision: "
                      "4 methods, train-all 4 epochs)")
  parser.add_argument("--data", type=Path,
                      help="your own data: vision, an .npz file with 'images' "
                      "(n, height, width, 3), ImageNet-normalised, and "
                      "'labels' (n,), integer classes from 0; text, a CSV "
                      "file with a header and columns 'text' and 'label'")
  parser.add_argument("--epochs", type=int,
                      help="override train-all's epochs (the time budget)")
  parser.add_argument("--seeds", type=int,
                      help="override the number of seeds (0, 1, ...)")
  parser.add_argument("--methods",
                      help="comma-separated method names to run (default: "
                      "the mode's; train-all is needed for budgets)")
  parser.add_argument("--fixed-rates", action="store_true",
                      help="one rate per method, the quick run's, instead of "
                      "the mode's grids (no selection runs)")
  parser.add_argument("--bn", choices=("frozen", "train"), default="frozen",
                      help="vision: BatchNorm keeps the pretrained running "
                      "statistics (default) or trains with batch statistics")
  parser.add_argument("--image-size", type=int,
                      help="vision: override the side of the digit images")
  parser.add_argument("--max-length", type=int,
                      help="text: override the tokens per text")
  parser.add_argument("--no-bucketing", action="store_true",
                      help="text: pad every batch to --max-length rather "
                      "than cut it to the shortest multiple of 8 tokens that "
                      "fits its longest text (the same texts in each batch "
                      "either way)")
  parser.add_argument("--clock", choices=("wall", "process"),
                      default="wall",
                      help="training time as wall-clock seconds (default) "
                      "or CPU seconds of this process (all threads), which "
                      "other jobs on a shared machine disturb much less")
  parser.add_argument("--out", type=Path, default=Path("results/finetune"),
                      help="output directory (default results/finetune)")
  add_compilation_cache_arguments(parser)
  args = parser.parse_args(argv)
  task = TASKS[args.task]
  settings = task.full if args.full else task.quick
  overrides = {"bn": args.bn, "clock": args.clock,
               "bucketing": not args.no_bucketing}
  if args.epochs is not None:
    overrides["epochs"] = args.epochs
  if args.seeds is not None:
    overrides["seeds"] = tuple(range(args.seeds))
  if args.methods is not None:
    overrides["methods"] = tuple(args.methods.split(","))
  if args.fixed_rates:
    overrides["grids"] = task.quick.grids
  if args.image_size is not None:
    overrides["image_size"] = args.image_size
  if args.max_length is not None:
    overrides["max_length"] = args.max_length
  settings = dataclasses.replace(settings, **overrides)
  task.methods_in(settings)  # Refuses unknown method names now.
  return (task, settings, args.out, args.data,
          compilation_cache_directory(args))


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Runs the experiment ``argv`` asks for; prints the table, writes files."""
  task, settings, out, data, cache = parse_args(argv)
  enable_compilation_cache(cache)
  report = run_experiment(task, settings, task.load_splits(settings, data),
                          data_name=None if data is None else data.name)
  json_path, png_path = write_outputs(report, out)
  print(format_table(report["summary"], report["description"],
                     report["targets"]))
  print(f"total {report['wall_seconds']:.0f} s; wrote {json_path} and "
        f"{png_path}")


if __name__ == "__main__":
  main()
