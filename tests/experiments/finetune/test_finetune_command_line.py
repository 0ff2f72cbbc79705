"""The command line's data: the digits by default, or an .npz file."""

from pathlib import Path

import numpy as np
import pytest

from experiments.finetune.__main__ import parse_args
from experiments.finetune.experiment import load_splits


def test_own_data_from_an_npz_file(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(60, 12, 12, 3)).astype(np.float32)
  labels = np.arange(60) % 3
  np.savez(tmp_path / "mine.npz", images=images, labels=labels)
  settings, _, data = parse_args(["--data", str(tmp_path / "mine.npz")])
  splits = load_splits(settings, data)
  assert [len(s.labels) for s in splits] == [42, 9, 9]
  assert splits.num_classes == 3
  everything = np.concatenate([s.images for s in splits])
  assert sorted(map(bytes, everything)) == sorted(map(bytes, images))
  np.savez(tmp_path / "wrong.npz", pictures=images, labels=labels)
  with pytest.raises(ValueError, match=r"missing \['images'\]"):
    load_splits(settings, tmp_path / "wrong.npz")


def test_digits_are_the_default_data():
  settings, out, data = parse_args(["--image-size", "16"])
  assert data is None and out == Path("results/finetune")
  splits = load_splits(settings, data)
  assert splits.train.images.shape[1:] == (16, 16, 3)
  assert splits.num_classes == 10
