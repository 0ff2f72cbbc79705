"""Flax's MNIST and ImageNet examples and their multirate conversions: small diffs, and they run.

examples/mnist_{linen,nnx}.py are Flax's examples run offline on the digits;
examples/mnist_{linen,nnx}_multirate.py convert them. Each runs here for a
few steps on a few digits. examples/imagenet_linen.py (Flax's ImageNet
example: ResNet, jax.pmap, warm-up + cosine, DynamicScale) and its
conversion run under jax.pmap on 2 emulated CPU devices, in a subprocess
(tests/examples/_imagenet_worker.py), and are checked against each other.
"""

import ast
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from benchmarks.flax_examples import load_example

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Lines added or removed by the conversion, blank lines and the module
# docstring (which describes the conversion) left out.
MOST_CHANGED = {"linen": 12, "nnx": 9, "equinox": 8}
# The ImageNet conversion: lines added, and lines removed (its two
# dynamic-scale branches, its gradient code and apply_gradients, which the
# library's step replaces).
MOST_ADDED, MOST_REMOVED = 10, 34


def code_lines(path: Path) -> list[str]:
  source = path.read_text()
  docstring = ast.parse(source).body[0]
  lines = source.splitlines()
  del lines[docstring.lineno - 1:docstring.end_lineno]
  return [line for line in lines if line.strip()]


def changed_lines(example: str) -> list[str]:
  diff = difflib.unified_diff(
      code_lines(EXAMPLES / f"{example}.py"),
      code_lines(EXAMPLES / f"{example}_multirate.py"), lineterm="", n=0)
  return [line for line in diff
          if line[:1] in "+-" and line[:3] not in ("+++", "---")]


@pytest.mark.parametrize("example", ["linen", "nnx", "equinox"])
def test_conversion_changes_a_handful_of_lines(example):
  changed = changed_lines(f"mnist_{example}")
  assert 0 < len(changed) <= MOST_CHANGED[example], "\n".join(changed)


def test_imagenet_conversion_adds_a_handful_of_lines():
  changed = changed_lines("imagenet_linen")
  added = [line for line in changed if line.startswith("+")]
  removed = [line for line in changed if line.startswith("-")]
  assert 0 < len(added) <= MOST_ADDED, "\n".join(changed)
  assert len(removed) <= MOST_REMOVED, "\n".join(changed)
  # The removed lines: the gradient code, both dynamic-scale branches and
  # apply_gradients; nothing of the schedule, pmap or metrics code.
  assert any("dynamic_scale.value_and_grad" in line for line in removed)
  assert any("lax.pmean(grads" in line for line in removed)
  assert not any(name in line for line in removed
                 for name in ("jax.pmap(", "_schedule(", "compute_metrics(",
                              "cross_replica_mean(")), "\n".join(removed)


@pytest.mark.parametrize("example", ["mnist_linen", "mnist_linen_multirate",
                                     "mnist_nnx", "mnist_nnx_multirate"])
def test_example_runs_a_few_steps(example):
  module = load_example(example)
  config = module.get_config()
  config.num_epochs, config.batch_size, config.train_size = 1, 16, 96
  trained, seconds, accuracy = module.train_and_evaluate(config, workdir="")
  steps = 96 // 16
  if isinstance(trained, nnx.Module):
    # The NNX example's metrics are reset each epoch; the model's BatchNorm
    # statistics moved on every step, fast steps included.
    assert not np.allclose(trained.batch_norm1.mean.get_value(), 0.0)
  else:
    assert int(trained.step) == steps
  assert seconds > 0 and 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("example", ["mnist_equinox", "mnist_equinox_multirate"])
def test_equinox_example_runs_a_few_steps(example):
  module = load_example(example)
  trainloader, testloader = module.get_loaders(batch_size=16, train_size=96)
  model = module.CNN(module.jax.random.key(module.SEED))
  trained, seconds, accuracy = module.train(
      model, trainloader, testloader, module.optim, steps=7, print_every=5)
  # Every layer moved: the head on every step, the rest on slow steps.
  for before, after in zip(module.jax.tree.leaves(model),
                           module.jax.tree.leaves(trained)):
    if hasattr(before, "dtype"):
      assert not np.array_equal(before, after)
  assert seconds > 0 and 0.0 <= accuracy <= 1.0


@pytest.fixture(scope="module")
def imagenet_runs(tmp_path_factory):
  root = Path(__file__).resolve().parents[2]
  out = tmp_path_factory.mktemp("imagenet") / "runs.json"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
  done = subprocess.run(
      [sys.executable, str(Path(__file__).parent / "_imagenet_worker.py"),
       str(out)], env=env, cwd=root, capture_output=True, text=True,
      timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("example", ["imagenet_linen",
                                     "imagenet_linen_multirate"])
def test_imagenet_example_runs_a_few_steps_under_pmap(imagenet_runs, example):
  run = imagenet_runs["runs"][example]
  assert run["step"] == 4
  assert run["seconds"] > 0 and 0.0 <= run["accuracy"] <= 1.0
  assert run["replicas_equal"]  # params, optimizer state, batch statistics


def test_imagenet_first_step_is_the_examples_slow_step(imagenet_runs):
  first = imagenet_runs["first_step"]
  assert first["learning_rate"] > 0  # No warm-up here: the step moves.
  assert first["fast_moved"] > 1e-4 and first["slow_moved"] > 1e-4
  # The fast head takes the example's update; the slow layers, with drift,
  # 1 / period of it (float32 rounding of that division); the batch
  # statistics and the pmean'd metrics are the example's.
  assert first["fast_error"] <= 1e-7 * first["fast_moved"] * 10
  assert first["slow_error"] <= 1e-6 * max(1.0, first["slow_moved"])
  assert first["batch_stats_error"] <= 1e-7
  assert first["metrics_error"] <= 1e-7
  assert first["replicas_equal"]


def test_imagenet_dynamic_scale_counts_as_the_example(imagenet_runs):
  runs = imagenet_runs["half_precision"]
  want = runs["imagenet_linen"]["history"]
  got = runs["imagenet_linen_multirate"]["history"]
  for key in ("fin_steps", "scale", "metrics_scale"):
    assert [h[key] for h in got] == [h[key] for h in want], key
  # The NaN batch (step 3): skipped by both, the scale halved, fin_steps reset.
  for history in (want, got):
    assert history[3]["params_kept"] and history[3]["fin_steps"] == 0
    assert history[3]["scale"] == history[2]["scale"] / 2
    assert history[-1]["fin_steps"] == 2
  for run in runs.values():
    assert run["replicas_equal"] and run["params_finite"]
