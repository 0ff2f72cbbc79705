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


# Length buckets of token inputs (n, 2, length): ids, then the mask.

from experiments.data import LengthBuckets


def token_inputs(lengths, length):
  """Texts of the given lengths, ids 1.. then padding 0, as stored."""
  lengths = np.asarray(lengths)
  mask = (np.arange(length) < lengths[:, None]).astype(np.int32)
  ids = (np.arange(length) + 1)[None, :] * mask
  return np.stack([ids, mask], axis=1)


def test_buckets_cut_only_padding_to_the_shortest_bucket_that_fits():
  buckets = LengthBuckets.multiples(8, 20)
  assert buckets.lengths == (8, 16, 20) and buckets.max_length == 20
  for lengths, expected in (([1, 8], 8), ([9, 2], 16), ([16], 16),
                            ([17, 3], 20), ([20], 20), ([0, 0], 8)):
    inputs = token_inputs(lengths, 20)
    cut = buckets.trim(inputs)
    assert cut.shape == (len(lengths), 2, expected)
    np.testing.assert_array_equal(cut, inputs[..., :expected])
    assert not inputs[..., expected:].any()  # Only padding was cut.
  # A mask that is not a prefix: the length is one past its last token.
  inputs = token_inputs([3], 20)
  inputs[0, 1, 1] = 0
  assert LengthBuckets.text_lengths(inputs).tolist() == [3]
  assert LengthBuckets.multiples(16, 48).lengths == (16, 32, 48)


def test_bad_buckets_and_inputs_are_refused():
  for lengths in ((), (8, 8), (16, 8), (0, 8), (8.0,), (True, 8)):
    with pytest.raises(ValueError, match="strictly ascending"):
      LengthBuckets(lengths)
  buckets = LengthBuckets((8, 16))
  with pytest.raises(ValueError, match=r"shape \(n, 2, 16\).*\(2, 2, 12\)"):
    buckets.trim(token_inputs([3, 4], 12))
  with pytest.raises(ValueError, match="longer than the longest bucket, 16"):
    buckets.length_for(17)
  with pytest.raises(ValueError, match=r"\(n, 2, length\)"):
    LengthBuckets.text_lengths(np.zeros((3, 16)))


def test_used_buckets_keep_the_longest_and_those_with_enough_batches():
  buckets = LengthBuckets.multiples(8, 32)
  longest = [3] * 2 + [20] * 10 + [32] * 88
  assert buckets.used_by(longest).lengths == (8, 24, 32)
  assert buckets.used_by(longest, min_share=0.05).lengths == (24, 32)
  assert buckets.used_by(longest, min_share=0.5).lengths == (32,)
  assert buckets.used_by([]).lengths == (32,)
