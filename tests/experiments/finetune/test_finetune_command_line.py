"""The command line: the task option, and each task's data (its own by
default, or the user's file)."""

import csv
from pathlib import Path

import numpy as np
import pytest

from experiments.compilation_cache import DEFAULT_DIRECTORY
from experiments.finetune.__main__ import parse_args
from experiments.finetune.tasks import TEXT, VISION


def test_the_task_option_picks_model_data_methods_and_settings():
  task, settings, out, data, cache = parse_args([])
  assert task is VISION and settings == VISION.quick
  assert data is None and out == Path("results/finetune")
  assert cache == DEFAULT_DIRECTORY  # The persistent cache is on by default.
  task, settings, *_ = parse_args(["--task", "text", "--full"])
  assert task is TEXT and settings.task == "text" and not settings.quick
  assert settings.seeds == (0, 1, 2)
  assert [m.name for m in task.methods_in(settings)] == [
      m.name for m in TEXT.methods if m.name in TEXT.full.methods]
  assert settings.clock == "wall"
  task, settings, *_ = parse_args(["--task", "text", "--seeds", "2",
                                     "--epochs", "3", "--max-length", "32",
                                     "--methods", "train_all,train_head"])
  assert (settings.seeds, settings.epochs, settings.max_length) == (
      (0, 1), 3, 32)
  assert [m.name for m in task.methods_in(settings)] == [
      "train_all", "train_head"]
  _, settings, *_ = parse_args(["--task", "text", "--full",
                                  "--fixed-rates"])
  assert settings.grids == TEXT.quick.grids and not settings.quick
  _, settings, *_ = parse_args(["--clock", "process"])
  assert settings.clock == "process"
  with pytest.raises(ValueError, match="no method 'train_al'"):
    parse_args(["--methods", "train_al"])
  with pytest.raises(SystemExit):
    parse_args(["--task", "audio"])


def test_the_compilation_cache_flags(tmp_path):
  *_, cache = parse_args(["--compilation-cache", str(tmp_path / "c")])
  assert cache == tmp_path / "c"
  *_, cache = parse_args(["--no-compilation-cache"])
  assert cache is None


def test_own_images_from_an_npz_file(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(60, 12, 12, 3)).astype(np.float32)
  labels = np.arange(60) % 3
  np.savez(tmp_path / "mine.npz", images=images, labels=labels)
  task, settings, _, data, _ = parse_args(
      ["--data", str(tmp_path / "mine.npz")])
  splits = task.load_splits(settings, data)
  assert [len(s.labels) for s in splits] == [42, 9, 9]
  assert splits.num_classes == 3
  everything = np.concatenate([s.images for s in splits])
  assert sorted(map(bytes, everything)) == sorted(map(bytes, images))
  np.savez(tmp_path / "wrong.npz", pictures=images, labels=labels)
  with pytest.raises(ValueError, match=r"missing \['images'\]"):
    task.load_splits(settings, tmp_path / "wrong.npz")


def test_digits_are_the_default_data():
  task, settings, _, data, _ = parse_args(["--image-size", "16"])
  splits = task.load_splits(settings, data)
  assert splits.train.images.shape[1:] == (16, 16, 3)
  assert splits.num_classes == 10


def test_own_texts_from_a_csv_file(tmp_path):
  path = tmp_path / "mine.csv"
  rows = [(f"a {'good' if i % 2 else 'bad'} film number {i}, truly",
           "pos" if i % 2 else "neg") for i in range(40)]
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["id", "text", "label"])
    writer.writerows((i, text, label) for i, (text, label) in enumerate(rows))
  task, settings, _, data, _ = parse_args(["--task", "text", "--data",
                                        str(path), "--max-length", "16"])
  splits = task.load_splits(settings, data)
  assert [len(s.labels) for s in splits] == [28, 6, 6]
  assert splits.num_classes == 2
  inputs = splits.train.inputs
  assert inputs.shape == (28, 2, 16) and inputs.dtype == np.int32
  ids, mask = inputs[:, 0], inputs[:, 1]
  assert (ids[:, 0] == 101).all()  # [CLS]
  assert ((ids == 0) == (mask == 0)).all()  # padding
  # Labels follow the texts ('neg' < 'pos'): 'good' texts are class 1.
  decoded = {int(label) for text, label in zip(ids, splits.train.labels)
             if 2204 in text}  # WordPiece id of 'good'
  assert decoded == {1}


def test_the_quick_text_run_keeps_the_first_examples_of_each_split():
  splits = TEXT.load_splits(TEXT.quick)
  assert [len(s.labels) for s in splits] == list(TEXT.quick.split_sizes)
  assert splits.train.inputs.shape[1:] == (2, TEXT.quick.max_length)
  assert splits.num_classes == 2
