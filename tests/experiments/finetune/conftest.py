"""Fixtures of the fine-tuning experiment's tests: the real network's parameter
shapes, and a tiny stand-in with its top-level names that trains in seconds."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments.data import Dataset, Splits, load_digits_splits
from experiments.finetune import selection
from experiments.finetune.experiment import run_experiment
from experiments.finetune.reporting import write_outputs
from experiments.finetune.settings import METHODS, QUICK
from experiments.models import HEAD_FEATURES, EfficientNetLite0


@pytest.fixture(scope="session")
def efficientnet_params():
  variables = jax.eval_shape(EfficientNetLite0(num_classes=10).init,
                             jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return variables["params"]


class ConvBatchNorm(nn.Module):
  features: int
  depthwise: bool = False

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3),
                feature_group_count=self.features if self.depthwise else 1,
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     name="bn")(x)
    return nn.relu(x)


class TinyNet(nn.Module):
  """EfficientNetLite0's top-level names and call, a few hundred weights."""
  num_classes: int = 1000
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, images, train=False, deterministic=None):
    deterministic = not train if deterministic is None else deterministic
    x = ConvBatchNorm(4, name="stem")(images, train)
    x = ConvBatchNorm(4, depthwise=True, name="blocks_14")(x, train)
    x = ConvBatchNorm(4, name="blocks_15")(x, train)
    x = nn.Conv(HEAD_FEATURES, (1, 1), use_bias=False, name="head")(x)
    x = nn.Dropout(self.dropout_rate)(x.mean((1, 2)),
                                      deterministic=deterministic)
    return nn.Dense(self.num_classes, name="classifier")(x)


@pytest.fixture(scope="session")
def tiny_pretrained():
  """``tiny_pretrained(dropout_rate=0.2) -> (model, variables)``."""

  def pretrained(dropout_rate=0.2):
    model = TinyNet(dropout_rate=dropout_rate)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))

  return pretrained


@pytest.fixture(scope="session")
def tiny_splits():
  splits = load_digits_splits(image_size=8, seed=0)
  return Splits(*(Dataset(s.images[:n], s.labels[:n])
                  for s, n in zip(splits, (48, 20, 20))))


@pytest.fixture(scope="session")
def tiny_run(tiny_pretrained, tiny_splits, tmp_path_factory):
  """A whole run of every method, tiny, with spies on training and testing.

  Returns:
    ``(settings, report, evaluated, paths, trained)``: ``evaluated`` holds
    ``(during selection, data)`` of every accuracy evaluation, ``trained`` the
    seed of every training run.
  """
  grids = {method.name: {rate: (0.01,) for rate in method.rate_names}
           for method in METHODS}
  grids["train_classifier"] = {"learning_rate": (0.01, 0.1)}
  settings = dataclasses.replace(
      QUICK, image_size=8, epochs=2, batch_size=16, period=2, grids=grids)
  evaluated, selecting, trained = [], [], []
  monkeypatch = pytest.MonkeyPatch()
  real_accuracy, real_select = selection.accuracy, selection.select_rates
  real_fine_tune = selection.fine_tune

  def spy_fine_tune(*args):
    trained.append(args[-2])  # the seed
    return real_fine_tune(*args)

  def spy_accuracy(predict, variables, data, batch_size):
    evaluated.append((bool(selecting), data))
    return real_accuracy(predict, variables, data, batch_size)

  def spy_select(*args):
    selecting.append(True)
    try:
      return real_select(*args)
    finally:
      selecting.pop()

  monkeypatch.setattr(selection, "accuracy", spy_accuracy)
  monkeypatch.setattr(selection, "select_rates", spy_select)
  monkeypatch.setattr(selection, "fine_tune", spy_fine_tune)
  try:
    report = run_experiment(settings, tiny_splits,
                            pretrained=tiny_pretrained())
  finally:
    monkeypatch.undo()
  out = tmp_path_factory.mktemp("finetune")
  paths = write_outputs(report, settings, out)
  return settings, report, evaluated, paths, trained
