"""Stratified train/validation/test splits of any ``(images, labels)`` arrays.

:func:`stratified_split_indices` splits the indices of any labelled examples
(texts too); :func:`stratified_splits` applies it to image arrays;
:func:`stratified_subset` keeps a share of one split (fewer training
examples, same class proportions).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import sklearn.model_selection


class Dataset(NamedTuple):
  """Examples of one split.

  Attributes:
    images: float32, shape (n, height, width, channels).
    labels: int32, shape (n,), class indices from 0.
  """
  images: np.ndarray
  labels: np.ndarray


class Splits(NamedTuple):
  """Three disjoint splits of one data set."""
  train: Dataset
  validation: Dataset
  test: Dataset

  @property
  def num_classes(self) -> int:
    """One more than the largest label of any split."""
    return 1 + max(int(split.labels.max()) for split in self)


def _split_size(fraction: float, total: int, name: str,
                num_classes: int) -> int:
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"{name} must be a fraction in (0, 1), got {fraction!r}.")
  size = round(fraction * total)
  if size < num_classes:
    raise ValueError(
        f"{name}={fraction} gives {size} of {total} examples, fewer than one "
        f"per class ({num_classes}); a stratified split needs more.")
  return size


def stratified_split_indices(
    labels: np.ndarray,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Indices of a train/validation/test split with the same class proportions.

  Args:
    labels: shape (n,), integer class indices from 0.
    validation_fraction: share of the examples in the validation split
      (rounded to a whole number of examples).
    test_fraction: share in the test split; the rest is the train split.
    seed: fixes the split; the same seed always gives the same split.

  Returns:
    ``(train, validation, test)``: disjoint int arrays of indices into
    ``labels`` that together cover them all, each split with every class in
    (nearly) the proportion it has in the whole data set.

  Example:
    >>> import numpy as np
    >>> from experiments.data import stratified_split_indices
    >>> train, validation, test = stratified_split_indices(np.arange(100) % 4)
    >>> len(train), len(validation), len(test)
    (70, 15, 15)
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (n,), got {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
    raise ValueError(
        f"labels must be integer class indices >= 0, got dtype {labels.dtype} "
        f"and minimum {labels.min()}.")
  total, num_classes = len(labels), len(np.unique(labels))
  test_size = _split_size(test_fraction, total, "test_fraction", num_classes)
  validation_size = _split_size(validation_fraction, total,
                                "validation_fraction", num_classes)
  if test_size + validation_size + num_classes > total:
    raise ValueError(
        f"validation_fraction={validation_fraction} and test_fraction="
        f"{test_fraction} leave {total - test_size - validation_size} of "
        f"{total} examples for training.")
  random_state = np.random.RandomState(seed)
  rest, test = sklearn.model_selection.train_test_split(
      np.arange(total), test_size=test_size, stratify=labels,
      random_state=random_state)
  train, validation = sklearn.model_selection.train_test_split(
      rest, test_size=validation_size, stratify=labels[rest],
      random_state=random_state)
  return train, validation, test


def stratified_splits(
    images: np.ndarray,
    labels: np.ndarray,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Splits:
  """Splits examples into train/validation/test with the same class proportions.

  Args:
    images: shape (n, height, width, channels); stored as float32.
    labels: shape (n,), integer class indices from 0; stored as int32.
    validation_fraction, test_fraction, seed: as for
      :func:`stratified_split_indices`.

  Returns:
    The splits, each with every class in (nearly) the proportion it has in
    the whole data set.

  Example:
    >>> import numpy as np
    >>> from experiments.data import stratified_splits
    >>> labels = np.arange(100) % 4
    >>> splits = stratified_splits(np.zeros((100, 8, 8, 3)), labels, seed=0)
    >>> [len(split.labels) for split in splits], splits.num_classes
    ([70, 15, 15], 4)
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(
        "images must have shape (n, height, width, channels) and labels shape "
        f"(n,), got {images.shape} and {labels.shape}.")
  indices = stratified_split_indices(labels, validation_fraction,
                                     test_fraction, seed)
  labels = labels.astype(np.int32)
  return Splits(*(Dataset(images[split], labels[split]) for split in indices))


def stratified_subset(data: Dataset, fraction: float, seed: int = 0
                      ) -> Dataset:
  """A share of ``data``'s examples, with the same class proportions.

  Args:
    data: one split (e.g. the train split of :func:`stratified_splits`).
    fraction: share of the examples kept, in (0, 1]; 1 returns ``data``
      itself. Rounded to a whole number of examples, at least one per class.
    seed: fixes which examples are kept; the same seed always keeps the same.

  Returns:
    The kept examples, in their order in ``data``.

  Example:
    >>> import numpy as np
    >>> from experiments.data import Dataset, stratified_subset
    >>> data = Dataset(np.arange(40.0).reshape(40, 1, 1, 1), np.arange(40) % 4)
    >>> kept = stratified_subset(data, 0.5, seed=0)
    >>> len(kept.labels), np.bincount(kept.labels).tolist()
    (20, [5, 5, 5, 5])
    >>> bool(np.all(kept.images[:, 0, 0, 0] % 4 == kept.labels))  # pairs kept
    True
  """
  labels = np.asarray(data.labels)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
  if fraction == 1.0:
    return data
  num_classes = len(np.unique(labels))
  size = round(fraction * len(labels))
  if size < num_classes:
    raise ValueError(
        f"fraction={fraction} keeps {size} of {len(labels)} examples, fewer "
        f"than one per class ({num_classes}); keep a larger share.")
  kept, _ = sklearn.model_selection.train_test_split(
      np.arange(len(labels)), train_size=size, stratify=labels,
      random_state=np.random.RandomState(seed))
  kept = np.sort(kept)
  return Dataset(data.images[kept], data.labels[kept])
