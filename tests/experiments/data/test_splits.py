"""Stratified splits of any (images, labels) arrays."""

import numpy as np
import pytest

from experiments.data import (
    Splits, stratified_split_indices, stratified_splits)


def toy(n=200, classes=4, seed=0):
  """Distinct images (the first pixel is the example's index), unbalanced labels."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 6, 5, 3)).astype(np.float32)
  images[:, 0, 0, 0] = np.arange(n)
  labels = np.minimum(rng.geometric(0.4, size=n) - 1, classes - 1)
  return images, labels


def indices_of(split):
  return split.images[:, 0, 0, 0].astype(int)


def test_splits_partition_the_examples_and_keep_pairs():
  images, labels = toy()
  splits = stratified_splits(images, labels, validation_fraction=0.2,
                             test_fraction=0.25, seed=0)
  assert isinstance(splits, Splits)
  assert [len(s.labels) for s in splits] == [110, 40, 50]
  found = np.concatenate([indices_of(s) for s in splits])
  assert sorted(found) == list(range(200))
  for split in splits:
    np.testing.assert_array_equal(split.images, images[indices_of(split)])
    np.testing.assert_array_equal(split.labels, labels[indices_of(split)])
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32


def test_splits_keep_the_class_proportions():
  images, labels = toy()
  counts = np.bincount(labels)
  assert counts.min() < counts.max() / 2  # unbalanced on purpose
  for split in stratified_splits(images, labels, seed=3):
    expected = counts * len(split.labels) / len(labels)
    assert np.all(np.abs(np.bincount(split.labels, minlength=4) - expected)
                  <= 1)


def test_split_depends_only_on_the_seed():
  images, labels = toy()
  first, again, other = (stratified_splits(images, labels, seed=seed)
                         for seed in (0, 0, 1))
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(indices_of(a), indices_of(b))
    assert set(indices_of(a)) != set(indices_of(c))


def test_num_classes_is_one_more_than_the_largest_label():
  images, labels = toy(classes=4)
  assert stratified_splits(images, labels).num_classes == 4


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((10, 4, 4)), np.zeros(10, int), "images must have shape"),
    (np.zeros((10, 4, 4, 3)), np.zeros(9, int), "labels shape"),
    (np.zeros((10, 4, 4, 3)), np.zeros(10), "integer class indices"),
    (np.zeros((10, 4, 4, 3)), -np.ones(10, int), "minimum -1"),
    (np.zeros((30, 4, 4, 3)), np.arange(30) % 10, "fewer than one per class"),
])
def test_bad_inputs_are_refused(images, labels, message):
  with pytest.raises(ValueError, match=message):
    stratified_splits(images, labels)


def test_split_indices_are_the_splits_of_stratified_splits():
  images, labels = toy()
  indices = stratified_split_indices(labels, 0.2, 0.25, seed=5)
  splits = stratified_splits(images, labels, 0.2, 0.25, seed=5)
  for index, split in zip(indices, splits):
    np.testing.assert_array_equal(index, indices_of(split))
  with pytest.raises(ValueError, match=r"labels must have shape \(n,\)"):
    stratified_split_indices(labels.reshape(20, 10))


def test_a_stratified_subset_keeps_rows_and_class_shares():
  from experiments.data import Dataset, stratified_subset
  images, labels = toy(n=400)
  data = Dataset(images, labels.astype(np.int32))
  kept = stratified_subset(data, 0.25, seed=3)
  assert len(kept.labels) == 100
  rows = indices_of(kept)
  assert list(rows) == sorted(set(rows))  # distinct, in the data's order
  np.testing.assert_array_equal(kept.images, images[rows])
  np.testing.assert_array_equal(kept.labels, labels[rows])
  # Each class keeps a quarter of its examples, to within one.
  for c, n in enumerate(np.bincount(labels)):
    assert abs(np.sum(kept.labels == c) - n / 4) <= 1
  again = stratified_subset(data, 0.25, seed=3)
  np.testing.assert_array_equal(indices_of(again), rows)
  assert stratified_subset(data, 1.0) is data


@pytest.mark.parametrize("fraction", [0.0, 1.5, 0.005])
def test_a_stratified_subset_refuses_bad_fractions(fraction):
  from experiments.data import Dataset, stratified_subset
  images, labels = toy(n=400)
  with pytest.raises(ValueError, match="fraction"):
    stratified_subset(Dataset(images, labels), fraction)
