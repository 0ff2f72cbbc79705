"""The digits splits."""

import collections

import numpy as np
import pytest
import sklearn.datasets

from experiments.data import (
    IMAGENET_MEAN, IMAGENET_STD, Dataset, digits_to_images, load_digits_splits)


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
