"""all-MiniLM-L6-v2's WordPiece tokenizer, to fixed-shape int32 arrays.

The packaged ``tokenizer.json`` (read with the ``tokenizers`` package: BERT's
uncased normaliser and WordPiece, ``[CLS] text [SEP]``) pads and truncates to
128 tokens by default; :class:`MiniLMTokenizer` replaces both with the length
asked for, so that every batch has one shape and a jitted step compiles once.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments.models.minilm import MiniLMConfig
from experiments.models.minilm_weights import minilm_file

_PAD_TOKEN = "[PAD]"


class Tokens(NamedTuple):
  """A batch of tokenised texts, padded on the right.

  Attributes:
    input_ids: int32, shape (n, max_length), WordPiece ids starting with
      [CLS] and ending with [SEP] (truncated texts keep their [SEP]).
    attention_mask: int32, same shape, 1 for tokens and 0 for padding.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray


class MiniLMTokenizer:
  """Texts to :class:`Tokens` of a fixed length.

  Args:
    path: a ``tokenizer.json``; the one packaged with the weights when None.

  Example:
    >>> from experiments.models.minilm_tokenizer import MiniLMTokenizer
    >>> tokens = MiniLMTokenizer()(["Hello world!", "Hi"], max_length=6)
    >>> tokens.input_ids.tolist()
    [[101, 7592, 2088, 999, 102, 0], [101, 7632, 102, 0, 0, 0]]
    >>> tokens.attention_mask.tolist()
    [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
  """

  def __init__(self, path: str | pathlib.Path | None = None):
    # Imported here so that experiments.models imports without the text extra.
    import tokenizers
    path = minilm_file("tokenizer.json") if path is None else path
    self._json = pathlib.Path(path).read_text(encoding="utf-8")
    self._from_str = tokenizers.Tokenizer.from_str
    plain = self._from_str(self._json)
    self._pad_id = plain.token_to_id(_PAD_TOKEN)
    if self._pad_id is None:
      raise ValueError(f"{path} has no {_PAD_TOKEN} token.")
    # One configured tokenizer per length: setting padding and truncation
    # mutates a tokenizer, so a shared one would change under other callers.
    self._by_length: dict[int, Any] = {}

  def _tokenizer(self, max_length: int) -> Any:
    if max_length not in self._by_length:
      tokenizer = self._from_str(self._json)
      tokenizer.enable_truncation(max_length=max_length)
      tokenizer.enable_padding(length=max_length, pad_id=self._pad_id,
                               pad_token=_PAD_TOKEN)
      self._by_length[max_length] = tokenizer
    return self._by_length[max_length]

  def __call__(self, texts: Sequence[str], max_length: int) -> Tokens:
    """Tokenises, truncates and pads ``texts`` to ``max_length`` tokens each.

    Args:
      texts: the texts (a list, not a single string).
      max_length: tokens per text, [CLS] and [SEP] included; 3 to 512 (the
        model's positions).

    Returns:
      :class:`Tokens` of shape (len(texts), max_length).
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise TypeError("texts must be a sequence of strings, got "
                      f"{type(texts).__name__}"
                      + (" (wrap a single text in a list)."
                         if isinstance(texts, str) else "."))
    longest = MiniLMConfig().max_positions
    if isinstance(max_length, bool) or not isinstance(
        max_length, (int, np.integer)) or not 3 <= max_length <= longest:
      raise ValueError(
          f"max_length must be an int in [3, {longest}] ([CLS], at least one "
          f"token, [SEP]; the model has {longest} positions), got "
          f"{max_length!r}.")
    encodings = self._tokenizer(int(max_length)).encode_batch(list(texts))
    shape = (len(encodings), int(max_length))
    return Tokens(
        np.array([e.ids for e in encodings], np.int32).reshape(shape),
        np.array([e.attention_mask for e in encodings],
                 np.int32).reshape(shape))
