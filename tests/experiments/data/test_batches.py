"""The minibatch iterator."""

import numpy as np
import pytest

from experiments.data import shuffled_batches


def identifiable(n):
  """Images whose every pixel holds the example's index, labels = index."""
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                           (n, 2, 2, 3))
  return images, np.arange(n)


def test_batches_cover_each_example_once_per_epoch():
  images, labels = identifiable(100)
  batches = list(shuffled_batches(images, labels, 10, seed=0, epoch=0))
  assert len(batches) == 10
  seen = np.concatenate([batch_labels for _, batch_labels in batches])
  assert sorted(seen) == list(range(100))
  assert not np.array_equal(seen, np.arange(100))  # shuffled
  for batch_images, batch_labels in batches:
    assert batch_images.shape == (10, 2, 2, 3)
    np.testing.assert_array_equal(batch_images[:, 0, 0, 0], batch_labels)


def test_batches_drop_the_remainder():
  images, labels = identifiable(100)
  batches = list(shuffled_batches(images, labels, 30, seed=0))
  assert [len(b) for _, b in batches] == [30, 30, 30]
  seen = np.concatenate([b for _, b in batches])
  assert len(set(seen.tolist())) == 90


def test_batch_order_depends_on_seed_and_epoch():
  images, labels = identifiable(64)

  def order(seed, epoch):
    return np.concatenate([b for _, b in shuffled_batches(
        images, labels, 16, seed=seed, epoch=epoch)])

  np.testing.assert_array_equal(order(0, 1), order(0, 1))
  assert not np.array_equal(order(0, 1), order(0, 2))
  assert not np.array_equal(order(0, 1), order(1, 1))


def test_batch_errors_are_raised_at_the_call():
  images, labels = identifiable(10)
  with pytest.raises(ValueError, match=r"shapes \(10, 2, 2, 3\) and \(9,\)"):
    shuffled_batches(images, labels[:9], 2, seed=0)
  with pytest.raises(ValueError,
                     match=r"batch_size must be an int in \[1, 10\]"):
    shuffled_batches(images, labels, 11, seed=0)
