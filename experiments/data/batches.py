"""Minibatches of one fixed size from any ``(images, labels)`` arrays, and
token batches cut to a few fixed lengths.

Every batch of :func:`shuffled_batches` has the same shape, so a jitted train
step compiles once; :class:`LengthBuckets` cuts token batches to the shortest
of a few fixed lengths that fits their longest text (one program per length).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """Token batches cut to the shortest of a few fixed lengths that fits them.

  Token inputs have shape ``(n, 2, length)``: token ids, then the attention
  mask (1 for tokens, 0 for padding), padded at the end, as the text task
  stores them. Cutting a batch's trailing columns that are padding in every
  row changes no text: the mask leaves padding out of the attention and the
  pooling, and the positions kept are the same. A batch goes to the shortest
  bucket at least as long as its longest text, so a jitted step sees at most
  ``len(lengths)`` input shapes.

  Attributes:
    lengths: the bucket lengths, ascending; the last is the stored length
      (a batch that needs no less is left whole).

  Example:
    >>> import numpy as np
    >>> from experiments.data import LengthBuckets
    >>> buckets = LengthBuckets.multiples(8, 20)
    >>> buckets.lengths
    (8, 16, 20)
    >>> mask = (np.arange(20) < np.array([[3], [11]])).astype(np.int32)
    >>> inputs = np.stack([mask * 5, mask], axis=1)      # (2, 2, 20)
    >>> LengthBuckets.text_lengths(inputs).tolist()
    [3, 11]
    >>> buckets.trim(inputs).shape, buckets.trim(inputs[:1]).shape
    ((2, 2, 16), (1, 2, 8))
  """
  lengths: tuple[int, ...]

  def __post_init__(self):
    lengths = tuple(self.lengths)
    if (not lengths or any(isinstance(n, bool) or not isinstance(n, int)
                           or n < 1 for n in lengths)
        or list(lengths) != sorted(set(lengths))):
      raise ValueError(
          "lengths must be positive ints in strictly ascending order, the "
          f"last the stored length, got {self.lengths!r}.")
    object.__setattr__(self, "lengths", lengths)

  @classmethod
  def multiples(cls, multiple: int, max_length: int) -> LengthBuckets:
    """Buckets at every multiple of ``multiple`` below ``max_length``, and
    ``max_length``.

    Example:
      >>> from experiments.data import LengthBuckets
      >>> LengthBuckets.multiples(8, 48).lengths
      (8, 16, 24, 32, 40, 48)
    """
    if multiple < 1 or max_length < 1:
      raise ValueError(f"multiple and max_length must be at least 1, got "
                       f"{multiple!r} and {max_length!r}.")
    return cls(tuple(range(multiple, max_length, multiple)) + (max_length,))

  @property
  def max_length(self) -> int:
    return self.lengths[-1]

  @staticmethod
  def text_lengths(inputs: np.ndarray) -> np.ndarray:
    """Each text's length: one past its last position of mask 1 (0 for an
    all-padding row), shape ``(n,)``.

    Example:
      >>> import numpy as np
      >>> from experiments.data import LengthBuckets
      >>> mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
      >>> LengthBuckets.text_lengths(np.stack([mask, mask], 1)).tolist()
      [2, 0, 4]
    """
    inputs = np.asarray(inputs)
    if inputs.ndim != 3 or inputs.shape[1] != 2:
      raise ValueError(
          "token inputs must have shape (n, 2, length): ids, then the "
          f"attention mask; got shape {inputs.shape}.")
    tokens = inputs[:, 1] > 0
    last = tokens.shape[1] - np.argmax(tokens[:, ::-1], axis=1)
    return np.where(tokens.any(axis=1), last, 0)

  def length_for(self, longest: int) -> int:
    """The shortest bucket of at least ``longest`` tokens.

    Example:
      >>> from experiments.data import LengthBuckets
      >>> [LengthBuckets((8, 16)).length_for(n) for n in (0, 8, 9)]
      [8, 8, 16]
    """
    for length in self.lengths:
      if longest <= length:
        return length
    raise ValueError(
        f"a text of {longest} tokens is longer than the longest bucket, "
        f"{self.max_length}; tokenise to at most {self.max_length} tokens or "
        "add a longer bucket.")

  def trim(self, inputs: np.ndarray) -> np.ndarray:
    """``inputs`` cut to the bucket of its longest text (a view)."""
    inputs = np.asarray(inputs)
    if inputs.ndim != 3 or inputs.shape[2] != self.max_length:
      raise ValueError(
          f"token inputs must have shape (n, 2, {self.max_length}) (the "
          f"longest bucket), got {inputs.shape}.")
    lengths = self.text_lengths(inputs)
    return inputs[..., :self.length_for(int(lengths.max(initial=0)))]

  def used_by(self, lengths: np.ndarray, min_share: float = 0.0
              ) -> LengthBuckets:
    """The buckets that at least ``min_share`` of batches whose longest
    texts are ``lengths`` fall in, and always the longest.

    Batches of a left-out bucket go to the next longer one kept: fewer
    programs to compile for the few steps they would save.

    Example:
      >>> from experiments.data import LengthBuckets
      >>> buckets = LengthBuckets.multiples(8, 32)
      >>> buckets.used_by([3, 30, 31, 20]).lengths
      (8, 24, 32)
      >>> buckets.used_by([3, 30, 31, 20], min_share=0.5).lengths
      (32,)
    """
    counts = np.bincount([self.lengths.index(self.length_for(int(n)))
                          for n in lengths], minlength=len(self.lengths))
    total = max(1, int(counts.sum()))
    return LengthBuckets(tuple(
        length for length, count in zip(self.lengths, counts)
        if length == self.max_length or (count and count >= min_share * total)))
