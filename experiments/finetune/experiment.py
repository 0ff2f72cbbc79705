"""The whole experiment: every method on one data set, in one report.

The data are scikit-learn's digits, or your own images (``--data``); either
way split into train/validation/test with the same class proportions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import numpy as np
import tqdm

from experiments.data import Splits, load_digits_splits, stratified_splits
from experiments.finetune.reporting import describe, machine, summarise
from experiments.finetune.selection import run_method, runs_of
from experiments.finetune.settings import METHODS, Method, Settings
from experiments.models import load_pretrained_efficientnet_lite0

PyTree = Any


def load_splits(settings: Settings, data: Optional[Path] = None) -> Splits:
  """The experiment's data, split with ``settings.split_seed``.

  Args:
    settings: the run's settings.
    data: ``None`` for scikit-learn's digits at ``settings.image_size``, or an
      ``.npz`` file with arrays ``images`` (n, height, width, 3), float,
      normalised as the pretrained network expects (ImageNet mean and
      standard deviation, see :data:`experiments.data.IMAGENET_MEAN`),
      and ``labels`` (n,), integer classes from 0.
  """
  if data is None:
    return load_digits_splits(image_size=settings.image_size,
                              seed=settings.split_seed)
  with np.load(data) as arrays:
    missing = {"images", "labels"} - set(arrays.files)
    if missing:
      raise ValueError(f"{data} must hold arrays 'images' and 'labels'; "
                       f"missing {sorted(missing)}, found {arrays.files}.")
    images, labels = arrays["images"], arrays["labels"]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{data}: images must have shape (n, height, width, 3), "
                     f"got {images.shape}.")
  return stratified_splits(images, labels, seed=settings.split_seed)


def run_experiment(
    settings: Settings,
    splits: Optional[Splits] = None,
    methods: Sequence[Method] = METHODS,
    pretrained: Optional[tuple[nn.Module, PyTree]] = None,
    data_name: str = "digits",
) -> dict[str, Any]:
  """Runs every method; returns settings, machine, per-method results and summary.

  Args:
    settings: the run's settings.
    splits: the data; default the digits at ``settings.image_size``
      (:func:`load_splits`).
    methods: the methods to compare.
    pretrained: ``(model, variables)`` to fine-tune (its classifier is
      replaced); default the ImageNet EfficientNet-Lite0.
    data_name: the data's name in the outputs.
  """
  if splits is None:
    splits = load_splits(settings)
  if pretrained is None:
    pretrained = load_pretrained_efficientnet_lite0()
  machine_before = machine()
  start = time.perf_counter()
  total_epochs = sum(runs_of(m, settings) for m in methods) * settings.epochs
  with tqdm.tqdm(total=total_epochs, unit="epoch", desc="fine-tuning",
                 dynamic_ncols=True) as progress:
    results = [run_method(method, pretrained, splits, settings, progress)
               for method in methods]
  return {
      "settings": dataclasses.asdict(settings),
      "description": describe(settings),
      "data": data_name,
      "machine_at_start": machine_before,
      "load_average_at_end": os.getloadavg(),
      "wall_seconds": time.perf_counter() - start,
      "split_sizes": {name: len(getattr(splits, name).labels)
                      for name in Splits._fields},
      "methods": results,
      "summary": summarise(results),
  }
