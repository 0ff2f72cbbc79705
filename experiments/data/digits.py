"""A small image-classification task from scikit-learn's bundled digits.

:func:`load_digits_splits` turns the 1,797 8x8 grey digits that ship inside
scikit-learn into RGB images of a chosen size, normalised like ImageNet inputs
so that an ImageNet-pretrained network can be fine-tuned on them, split into
train/validation/test sets with the same class proportions
(:func:`~experiments.data.stratified_splits`, which takes any
``(images, labels)`` arrays). No download.
:func:`experiments.data.shuffled_batches` serves them as minibatches.
"""

from __future__ import annotations

import jax
import numpy as np
import sklearn.datasets

from experiments.data.splits import Splits, stratified_splits

# Per-channel statistics of ImageNet's training images (RGB, values in [0, 1]),
# the normalisation torchvision's pretrained models expect.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

NUM_DIGIT_CLASSES = 10
_DIGITS_MAX_VALUE = 16.0  # The digits' pixel counts range over 0..16.


def digits_to_images(digits: np.ndarray, image_size: int,
                     max_value: float = _DIGITS_MAX_VALUE) -> np.ndarray:
  """Grey digits (values 0..``max_value``) to ImageNet-normalised RGB images.

  Args:
    digits: shape (n, height, width): scikit-learn's 8x8 digits (values
      0..16, the default ``max_value``) or MNIST's 28x28 (0..255).
    image_size: side of the output images; bilinear resampling.
    max_value: the pixel value that maps to white.

  Returns:
    float32 array of shape (n, image_size, image_size, 3).

  Example:
    >>> import numpy as np
    >>> from experiments.data import (
    ...     IMAGENET_MEAN, IMAGENET_STD, digits_to_images)
    >>> images = digits_to_images(np.full((2, 8, 8), 16.0), 32)
    >>> images.shape
    (2, 32, 32, 3)
    >>> bool(np.allclose(images * IMAGENET_STD + IMAGENET_MEAN, 1.0))
    True
  """
  grey = np.asarray(digits, np.float32) / max_value
  if grey.ndim != 3:
    raise ValueError(
        f"digits must have shape (n, height, width), got {grey.shape}.")
  resized = np.asarray(jax.image.resize(
      grey, (len(grey), image_size, image_size), method="linear"))
  # Bilinear interpolation stays within the inputs' range up to rounding.
  resized = np.clip(resized, 0.0, 1.0)
  return (resized[..., None] - IMAGENET_MEAN) / IMAGENET_STD


def load_digits_splits(
    image_size: int = 32,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Splits:
  """scikit-learn's digits as a stratified train/validation/test split of RGB images.

  Args:
    image_size: side of the square images, e.g. 32 or 64 (at least 8).
    validation_fraction, test_fraction, seed: of the split of the 1,797
      examples, as for :func:`~experiments.data.stratified_splits`.

  Example:
    >>> from experiments.data import load_digits_splits
    >>> splits = load_digits_splits(image_size=32, seed=0)
    >>> splits.train.images.shape, splits.test.labels.shape
    ((1257, 32, 32, 3), (270,))
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size < 8):
    raise ValueError(f"image_size must be an int >= 8, got {image_size!r}.")
  digits = sklearn.datasets.load_digits()
  return stratified_splits(digits_to_images(digits.images, image_size),
                           digits.target, validation_fraction, test_fraction,
                           seed)
