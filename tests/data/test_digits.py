"""The digits splits and the minibatch iterator."""

import collections

import numpy as np
import pytest
import sklearn.datasets

from multirate_optax.data import (
    IMAGENET_MEAN, IMAGENET_STD, Dataset, digits_to_images, load_digits_splits,
    shuffled_batches)


@pytest.fixture(scope="module")
def digits():
  return sklearn.datasets.load_digits()


@pytest.fixture(scope="module")
def splits():
  return load_digits_splits(image_size=32, validation_fraction=0.15,
                            test_fraction=0.15, seed=0)


def examples(dataset):
  """Multiset of (image bytes, label): sklearn's 1,797 digits are distinct."""
  return collections.Counter(
      (image.tobytes(), int(label))
      for image, label in zip(dataset.images, dataset.labels))


def bilinear_reference(grey, size):
  """Separable bilinear up-sampling, half-pixel centres, edges clamped."""
  n = grey.shape[-1]
  coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
  low = np.floor(coords).astype(int)
  high = np.minimum(low + 1, n - 1)
  weight = coords - low
  matrix = np.zeros((size, n))
  matrix[np.arange(size), low] += 1 - weight
  matrix[np.arange(size), high] += weight
  return np.einsum("ih,bhw,jw->bij", matrix, grey, matrix)


def test_split_sizes_partition_the_data(digits, splits):
  assert [len(s.labels) for s in splits] == [1257, 270, 270]
  for split in splits:
    assert split.images.shape == (len(split.labels), 32, 32, 3)
    assert split.images.dtype == np.float32
    assert split.labels.dtype == np.int32
  everything = examples(Dataset(digits_to_images(digits.images, 32),
                                digits.target))
  assert len(everything) == 1797
  train, validation, test = (examples(s) for s in splits)
  assert not (train & validation) and not (train & test) and not (
      validation & test)
  assert train + validation + test == everything


def test_splits_are_stratified(digits, splits):
  class_counts = np.bincount(digits.target, minlength=10)
  for split in splits:
    expected = class_counts * len(split.labels) / len(digits.target)
    found = np.bincount(split.labels, minlength=10)
    assert np.all(np.abs(found - expected) <= 1), (found, expected)


def test_split_depends_only_on_the_seed(splits):
  again = load_digits_splits(image_size=32, seed=0)
  other = load_digits_splits(image_size=32, seed=1)
  for mine, same, different in zip(splits, again, other):
    np.testing.assert_array_equal(mine.images, same.images)
    np.testing.assert_array_equal(mine.labels, same.labels)
    assert examples(mine) != examples(different)


def test_images_are_normalised_bilinear_upsamplings(digits):
  images = digits_to_images(digits.images[:50], 16)
  assert images.shape == (50, 16, 16, 3)
  grey = images * IMAGENET_STD + IMAGENET_MEAN  # back to [0, 1], per channel
  for channel in range(3):
    np.testing.assert_allclose(
        grey[..., channel], bilinear_reference(digits.images[:50] / 16.0, 16),
        atol=1e-5)


def test_value_range_is_that_of_normalised_unit_interval(splits):
  low = (0.0 - IMAGENET_MEAN) / IMAGENET_STD
  high = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
  images = splits.train.images
  assert np.all(images >= low - 1e-6) and np.all(images <= high + 1e-6)
  # Blank background and full strokes both occur.
  np.testing.assert_allclose(images.min((0, 1, 2)), low, atol=1e-6)
  np.testing.assert_allclose(images.max((0, 1, 2)), high, atol=1e-2)


def test_image_size_is_configurable():
  splits = load_digits_splits(image_size=64, validation_fraction=0.1,
                              test_fraction=0.2, seed=3)
  assert splits.train.images.shape[1:] == (64, 64, 3)
  assert [len(s.labels) for s in splits] == [1258, 180, 359]


@pytest.mark.parametrize("kwargs, message", [
    ({"test_fraction": 0.0}, "test_fraction must be a fraction"),
    ({"validation_fraction": 0.5, "test_fraction": 0.5}, "leave"),
    ({"image_size": 4}, "image_size must be an int >= 8"),
])
def test_bad_split_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    load_digits_splits(**kwargs)


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
