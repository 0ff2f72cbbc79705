"""Fixtures of the fine-tuning experiment's tests: the real networks' parameter
shapes, tiny stand-ins with their top-level names that train in seconds, and a
fake training clock."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.data import Dataset, Splits, load_digits_splits
from experiments.finetune import selection
from experiments.finetune.experiment import run_experiment
from experiments.finetune.reporting import write_outputs
from experiments.finetune.tasks import TEXT, VISION
from experiments.finetune.training import Examples
from _tiny_efficientnet import TinyNet
from experiments.models import EfficientNetLite0, MiniLM
from experiments.models.minilm import MiniLMClassifier, MiniLMConfig


@pytest.fixture(scope="session")
def efficientnet_params():
  variables = jax.eval_shape(EfficientNetLite0(num_classes=10).init,
                             jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return variables["params"]


@pytest.fixture(scope="session")
def minilm_params():
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.eval_shape(MiniLMClassifier(num_classes=2).init,
                             jax.random.key(0), ids, ids)
  return variables["params"]


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


# Two layers: compiling a step of six takes 15-30 s on a 2-core CPU. The
# methods that name layer_5 are tested on MiniLM's own paths instead.
TINY_MINILM = MiniLMConfig(vocab_size=64, max_positions=16, hidden_size=8,
                           num_layers=2, num_heads=2, intermediate_size=16)
TINY_TEXT_METHODS = ("train_all", "multirate_head", "train_head",
                     "multirate_head_half")


@pytest.fixture(scope="session")
def tiny_text_pretrained():
  """A randomly initialised encoder of MiniLM's layout, 2 layers of width 8."""
  encoder = MiniLM(TINY_MINILM)
  ids = jnp.ones((1, 12), jnp.int32)
  return encoder, encoder.init(jax.random.key(0), ids, ids)


@pytest.fixture(scope="session")
def tiny_text_splits():
  """Token ids and masks of 12 tokens; label 1 when token 7 appears."""
  rng = np.random.default_rng(0)

  def examples(n):
    ids = rng.integers(8, 64, size=(n, 12)).astype(np.int32)
    lengths = rng.integers(4, 13, size=n)
    mask = (np.arange(12) < lengths[:, None]).astype(np.int32)
    labels = np.arange(n) % 2
    ids[labels == 1, 1] = 7
    return Examples(np.stack([ids * mask, mask], axis=1),
                    labels.astype(np.int32))

  return Splits(examples(48), examples(16), examples(16))


class FakeClock:
  """A training clock that moves only when told: ``clock.now += seconds``."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture
def fake_clock():
  return FakeClock()


def make_tiny_settings(task, **overrides):
  """The task's quick settings, tiny: one rate per method, small batches."""
  grids = {method.name: {rate: (0.01,) for rate in method.rate_names}
           for method in task.methods}
  return dataclasses.replace(
      task.quick, epochs=2, batch_size=16, period=2,
      **{"grids": grids, "evaluations": 3, "methods": None, **overrides})


@pytest.fixture(scope="session")
def tiny_settings():
  """``tiny_settings(task, **overrides) -> Settings``."""
  return make_tiny_settings


@pytest.fixture(scope="session")
def tiny_run(tiny_pretrained, tiny_splits, tmp_path_factory):
  """A whole vision run of every method, tiny, with spies on every evaluation.

  Returns:
    ``(settings, report, evaluated, paths, trained)``: ``evaluated`` holds
    ``(phase, data)`` of every accuracy evaluation, phase ``'selecting'``
    (inside rate selection), ``'training'`` (inside a run) or ``'after'``;
    ``trained`` the seed of every training run.
  """
  grids = {method.name: {rate: (0.01,) for rate in method.rate_names}
           for method in VISION.methods}
  grids["train_classifier"] = {"learning_rate": (0.01, 0.1)}
  settings = make_tiny_settings(VISION, image_size=8, grids=grids)
  evaluated, phases, trained = [], [], []
  monkeypatch = pytest.MonkeyPatch()
  real_correct, real_select = selection.correct, selection.select_rates
  real_train = selection.train_and_evaluate

  def in_phase(phase, function):
    def spied(*args):
      phases.append(phase)
      try:
        return function(*args)
      finally:
        phases.pop()
    return spied

  def spy_train(*args):
    trained.append(args[7])  # the seed
    return in_phase("training", real_train)(*args)

  def spy_correct(predict, variables, data, batch_size):
    phase = "selecting" if "selecting" in phases else (
        phases[-1] if phases else "after")
    evaluated.append((phase, data))
    return real_correct(predict, variables, data, batch_size)

  monkeypatch.setattr(selection, "correct", spy_correct)
  monkeypatch.setattr(selection, "select_rates",
                      in_phase("selecting", real_select))
  monkeypatch.setattr(selection, "train_and_evaluate", spy_train)
  try:
    report = run_experiment(VISION, settings, tiny_splits,
                            pretrained=tiny_pretrained())
  finally:
    monkeypatch.undo()
  out = tmp_path_factory.mktemp("finetune")
  paths = write_outputs(report, out)
  return settings, report, evaluated, paths, trained


@pytest.fixture(scope="session")
def tiny_text_run(tiny_text_pretrained, tiny_text_splits, tmp_path_factory):
  """A whole text run on the tiny encoder (train-all, multirate with the head
  fast, head only, multirate planned for half of train-all's time);
  ``(settings, report, paths)``."""
  settings = make_tiny_settings(TEXT, methods=TINY_TEXT_METHODS)
  report = run_experiment(TEXT, settings, tiny_text_splits,
                          pretrained=tiny_text_pretrained)
  paths = write_outputs(report, tmp_path_factory.mktemp("finetune_text"))
  return settings, report, paths
