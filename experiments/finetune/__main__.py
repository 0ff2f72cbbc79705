"""The fine-tuning experiment's command line.

Run from the repository root::

  python -m experiments.finetune          # quick, < 5 min on a 2-core CPU
  python -m experiments.finetune --full   # 3 seeds, < 30 min
  python -m experiments.finetune --data my_images.npz   # your own images

``--data`` takes an ``.npz`` file of ``images`` (n, height, width, 3),
ImageNet-normalised, and ``labels`` (n,); they are split like the digits.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from experiments.finetune.experiment import load_splits, run_experiment
from experiments.finetune.reporting import format_table, write_outputs
from experiments.finetune.settings import FULL, QUICK, Settings


def parse_args(
    argv: Optional[Sequence[str]] = None,
) -> tuple[Settings, Path, Optional[Path]]:
  """The settings, the output directory and the data file (``None``: digits)."""
  parser = argparse.ArgumentParser(
      prog="python -m experiments.finetune",
      description="Fine-tune a pretrained EfficientNet-Lite0 on the digits: "
      "multirate training against every baseline.")
  parser.add_argument("--full", action="store_true",
                      help="the full experiment: 3 seeds, full grids, more "
                      "epochs (under 30 minutes on a 2-core CPU); default is a "
                      "quick run (under 5 minutes)")
  parser.add_argument("--bn", choices=("frozen", "train"), default="frozen",
                      help="BatchNorm: keep the pretrained running statistics "
                      "(default) or train with batch statistics")
  parser.add_argument("--epochs", type=int, help="override the epochs")
  parser.add_argument("--image-size", type=int,
                      help="override the side of the digit images")
  parser.add_argument("--data", type=Path,
                      help="your own data instead of the digits: an .npz file "
                      "with 'images' (n, height, width, 3), ImageNet-"
                      "normalised, and 'labels' (n,), integer classes from 0")
  parser.add_argument("--out", type=Path, default=Path("results/finetune"),
                      help="output directory (default results/finetune)")
  args = parser.parse_args(argv)
  settings = FULL if args.full else QUICK
  overrides = {"bn": args.bn}
  if args.epochs is not None:
    overrides["epochs"] = args.epochs
  if args.image_size is not None:
    overrides["image_size"] = args.image_size
  return dataclasses.replace(settings, **overrides), args.out, args.data


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Runs the experiment ``argv`` asks for; prints the table, writes files."""
  settings, out, data = parse_args(argv)
  report = run_experiment(settings, load_splits(settings, data),
                          data_name="digits" if data is None else data.name)
  json_path, png_path = write_outputs(report, settings, out)
  print(format_table(report["summary"], settings))
  print(f"total {report['wall_seconds']:.0f} s; wrote {json_path} and "
        f"{png_path}")


if __name__ == "__main__":
  main()
