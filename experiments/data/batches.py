"""Minibatches of one fixed size from any ``(images, labels)`` arrays.

Every batch has the same shape, so a jitted train step compiles once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def shuffled_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled minibatches, all of ``batch_size`` examples.

  The order depends only on ``(seed, epoch)``. The last ``n % batch_size``
  examples of the shuffled order are left out (a different remainder each
  epoch), so every batch has the same shape.

  Args:
    images: array with the examples along the first axis.
    labels: array with as many entries along its first axis.
    batch_size: examples per batch, 1 to n.
    seed: seed of the shuffling.
    epoch: epoch number; each epoch has its own order.

  Returns:
    An iterator over ``n // batch_size`` pairs ``(images, labels)``.

  Example:
    >>> import numpy as np
    >>> from experiments.data import shuffled_batches
    >>> images, labels = np.zeros((10, 4, 4, 3)), np.arange(10)
    >>> [b.shape for _, b in shuffled_batches(images, labels, 4, seed=0)]
    [(4,), (4,)]
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 0 or labels.ndim == 0 or (
      images.shape[0] != labels.shape[0]):
    raise ValueError(
        "images and labels need the same number of examples along their first "
        f"axis, got shapes {images.shape} and {labels.shape}.")
  total = images.shape[0]
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not (
      1 <= batch_size <= total):
    raise ValueError(
        f"batch_size must be an int in [1, {total}] (the number of examples), "
        f"got {batch_size!r}.")
  order = np.random.default_rng([seed, epoch]).permutation(total)
  # A generator expression rather than a generator function, so that the
  # checks above run at the call, not at the first batch.
  return ((images[indices], labels[indices])
          for indices in np.split(order[:total - total % batch_size],
                                  total // batch_size))
