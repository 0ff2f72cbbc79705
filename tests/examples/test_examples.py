"""Flax's MNIST examples and their multirate conversions: small diffs, and they run.

examples/mnist_{linen,nnx}.py are Flax's examples run offline on the digits;
examples/mnist_{linen,nnx}_multirate.py convert them. Each runs here for a
few steps on a few digits.
"""

import ast
import difflib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from benchmarks.flax_examples import load_example

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Lines added or removed by the conversion, blank lines and the module
# docstring (which describes the conversion) left out.
MOST_CHANGED = {"linen": 12, "nnx": 9, "equinox": 8}


def code_lines(path: Path) -> list[str]:
  source = path.read_text()
  docstring = ast.parse(source).body[0]
  lines = source.splitlines()
  del lines[docstring.lineno - 1:docstring.end_lineno]
  return [line for line in lines if line.strip()]


@pytest.mark.parametrize("example", ["linen", "nnx", "equinox"])
def test_conversion_changes_a_handful_of_lines(example):
  diff = difflib.unified_diff(
      code_lines(EXAMPLES / f"mnist_{example}.py"),
      code_lines(EXAMPLES / f"mnist_{example}_multirate.py"), lineterm="", n=0)
  changed = [line for line in diff
             if line[:1] in "+-" and line[:3] not in ("+++", "---")]
  assert 0 < len(changed) <= MOST_CHANGED[example], "\n".join(changed)


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
