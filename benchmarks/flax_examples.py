"""Flax's MNIST examples, as published and converted to multirate, on the digits.

Runs examples/mnist_linen.py and examples/mnist_nnx.py (Flax's Linen and NNX
MNIST examples, run offline on scikit-learn's digits at 28x28) with their own
optimizer, SGD(0.1, momentum 0.9), and their multirate conversions
(examples/mnist_*_multirate.py: the last layer fast, k = 5) from scratch:

- equal epochs: every run trains the examples' 10 epochs;
- equal time: a multirate run trains as many epochs as fit in the time the
  example's own optimizer took (measured here, same process), so it spends the
  time it saves on more epochs;
- median step: the example's compiled step against the multirate step, in
  interleaved blocks after warm-up.

Multirate recipes compared (h = 0.1, mu = 0.9, k = 5; the converted examples
make the dense layers fast), each as ``mo.multirate(fast, slow, period=k, ...)``:

- ``default``: ``mo.multirate(optax.sgd(h, mu), ...)``, the library's
  defaults (drift; the slow part moves one SGD(h) update per cycle), what the
  converted examples run;
- ``no drift``: the same with ``drift=False`` (that update at once);
- ``paper``: SGD(h/k) fast, SGD(h) slow, no drift (Vlaar & Leimkuhler's
  ``h_F = h/k``, ``h_S = h``; the README's former recipe).

The transformer of benchmarks/step_speed.py (4 pre-norm layers, d = 128) is
trained the same way on the digits read as 64 tokens (pixel values 0..16),
with Adam(1e-3) for 10 epochs against ``mo.train_step`` with the same
recipes (Adam in place of SGD, the head fast), equal epochs only.

Run from the repository root (``--quick``: 3 epochs, one recipe)::

  python -m benchmarks.flax_examples --json benchmarks/results/flax_examples.json

Timings on a shared CPU vary with its load: compare within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
H, MU, K = 0.1, 0.9, 5


def load_example(name: str) -> types.ModuleType:
  """Imports examples/<name>.py (examples/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def recipes() -> dict[str, Callable[..., optax.GradientTransformation]]:
  """Each recipe replaces the converted example's ``mo.multirate`` call."""

  def make(fast_rate, **kwargs):
    def multirate(fast, slow=None, *, labels, period):
      del fast, slow
      return mo.multirate(optax.sgd(fast_rate, MU), labels=labels,
                          period=period, **kwargs)
    return multirate

  def paper(fast, slow=None, *, labels, period):
    del fast, slow
    return mo.multirate(optax.sgd(H / period, MU), optax.sgd(H, MU),
                        labels=labels, period=period, drift=False)

  return {"default": mo.multirate, "no drift": make(H, drift=False),
          "paper": paper}


def with_multirate(module: types.ModuleType, multirate) -> types.ModuleType:
  """The converted example with ``mo.multirate`` replaced by ``multirate``."""
  module.mo = types.SimpleNamespace(
      multirate=multirate, fast_by_path=mo.fast_by_path, nnx=mo.nnx,
      linen=mo.linen)
  return module


def run(module, epochs: int, train_size) -> dict[str, Any]:
  config = module.get_config()
  config.num_epochs, config.train_size = epochs, train_size
  _, seconds, accuracy = module.train_and_evaluate(config, workdir="")
  return {"epochs": epochs, "train_s": seconds, "test_acc": 100 * accuracy}


def median_steps(steps: dict[str, Callable[[], Any]], repeats: int):
  """Median seconds per step of each step function, interleaved blocks."""
  times = {name: [] for name in steps}
  for name, step in steps.items():  # Warm up: compile every phase.
    for _ in range(2 * K):
      jax.block_until_ready(step())
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(K):  # Whole cycles.
        out = step()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / K)
  return {name: statistics.median(t) for name, t in times.items()}


def linen_steps(flax_example, multirate_example):
  config = flax_example.get_config()
  config.train_size = None
  train_ds, _ = flax_example.get_datasets(config)
  images, labels = train_ds["image"][:128], train_ds["label"][:128]
  rng = jax.random.key(0)
  states = {"flax": flax_example.create_train_state(rng, config),
            "multirate": multirate_example.create_train_state(rng, config)}

  def flax_step():
    grads, loss, _ = flax_example.apply_model(states["flax"], images, labels)
    states["flax"] = flax_example.update_model(states["flax"], grads)
    return loss

  def multirate_step():
    states["multirate"], (loss, _) = multirate_example.multirate_step(
        states["multirate"], images, labels)
    return loss

  return {"flax": flax_step, "multirate": multirate_step}


def nnx_steps(flax_example, multirate_example):
  from flax import nnx
  config = flax_example.get_config()
  config.train_size = None
  train_ds, _ = flax_example.get_datasets(config)
  batch = next(train_ds.as_numpy_iterator())
  steps = {}
  for name, example in (("flax", flax_example),
                        ("multirate", multirate_example)):
    model = example.CNN(rngs=nnx.Rngs(0))
    tx = (optax.sgd(H, MU) if example is flax_example else
          example.mo.multirate(
              optax.sgd(H, MU), period=K,
              labels=mo.nnx.fast_by_filter(nnx.Any(
                  nnx.PathContains("linear1"), nnx.PathContains("linear2")))))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                              loss=nnx.metrics.Average("loss"))
    rngs = nnx.Rngs(0)
    def step(example=example, model=model, optimizer=optimizer,
             metrics=metrics, rngs=rngs):
      example.train_step(model, optimizer, metrics, batch, rngs)
      return optimizer.step[...]
    steps[name] = step
  return steps


def transformer_rows(epochs: int, chosen) -> list[dict[str, Any]]:
  """The step benchmark's transformer from scratch on the digits as tokens."""
  import sklearn.datasets
  from benchmarks.step_speed import Transformer
  digits = sklearn.datasets.load_digits()
  tokens = np.int32(digits.images.reshape(len(digits.images), 64))
  labels = np.int32(digits.target)
  test = np.random.default_rng(0).permutation(len(tokens)) < len(tokens) // 4
  model = Transformer(vocab=17, length=64)
  params = model.init(jax.random.key(0), tokens[:1])["params"]
  rate, batch_size = 1e-3, 64

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[1]).mean()

  head = mo.fast_by_path("^head/")
  optimizers = {
      "adam": optax.adam(rate),
      "default": mo.multirate(optax.adam(rate), labels=head, period=K),
      "no drift": mo.multirate(optax.adam(rate), labels=head, period=K,
                               drift=False),
      "paper": mo.multirate(optax.adam(rate / K), optax.adam(rate),
                            labels=head, period=K, drift=False)}
  predict = jax.jit(lambda params, x: jnp.argmax(
      model.apply({"params": params}, x), -1))
  rows = []
  for name in ["adam"] + [c for c in chosen if c in optimizers]:
    tx = optimizers[name]
    if name == "adam":
      def plain_step(params, opt_state, batch, tx=tx):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
      step = jax.jit(plain_step)
    else:
      step = mo.train_step(loss_fn, tx)
    p, s = params, tx.init(params)
    order_rng, seconds = np.random.default_rng(0), 0.0
    train_x, train_y = tokens[~test], labels[~test]
    for _ in range(epochs):
      order = order_rng.permutation(len(train_x))
      start = time.perf_counter()
      for i in range(0, len(order) - batch_size + 1, batch_size):
        index = order[i:i + batch_size]
        p, s, loss = step(p, s, (train_x[index], train_y[index]))
      jax.block_until_ready(loss)
      seconds += time.perf_counter() - start
    accuracy = float(np.mean(np.asarray(predict(p, tokens[test]))
                             == labels[test]))
    rows.append({"example": "transformer", "optimizer": name,
                 "protocol": "equal epochs", "epochs": epochs,
                 "train_s": seconds, "test_acc": 100 * accuracy})
    print(f"{'transf.':8} {name:12} {epochs:6d} {seconds:8.1f} "
          f"{100 * accuracy:11.2f}")
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--examples", nargs="+",
                      default=["linen", "nnx", "transformer"])
  parser.add_argument("--recipes", nargs="+", default=None)
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--train-size", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps-only", action="store_true",
                      help="measure the median steps only")
  parser.add_argument("--json", type=Path, default=None)
  args = parser.parse_args(argv)
  epochs = args.epochs or (3 if args.quick else 10)
  chosen = args.recipes or (["default"] if args.quick else list(recipes()))
  rows = []
  print(f"{'example':8} {'optimizer':12} {'epochs':>6} {'train s':>8} "
        f"{'test acc. %':>11}")
  for example in args.examples:
    if example == "transformer":
      rows += transformer_rows(epochs, chosen)
      continue
    flax_example = load_example(f"mnist_{example}")
    if not args.steps_only:
      base = run(flax_example, epochs, args.train_size)
      base.update(example=example, optimizer="flax", protocol="equal epochs")
      rows.append(base)
      print(f"{example:8} {'flax':12} {epochs:6d} {base['train_s']:8.1f} "
            f"{base['test_acc']:11.2f}")
    for recipe in [] if args.steps_only else chosen:
      converted = with_multirate(load_example(f"mnist_{example}_multirate"),
                                 recipes()[recipe])
      same = run(converted, epochs, args.train_size)
      # As many epochs as fit in the example's time at this recipe's speed.
      fit = max(epochs, int(epochs * base["train_s"] / same["train_s"]))
      timed = run(converted, fit, args.train_size) if fit > epochs else same
      for protocol, row in (("equal epochs", same), ("equal time", timed)):
        row = dict(row, example=example, optimizer=recipe, protocol=protocol)
        rows.append(row)
        print(f"{example:8} {recipe:12} {row['epochs']:6d} "
              f"{row['train_s']:8.1f} {row['test_acc']:11.2f}  ({protocol})")
    steps = (linen_steps if example == "linen" else nnx_steps)(
        flax_example, load_example(f"mnist_{example}_multirate"))
    medians = median_steps(steps, args.repeats)
    rows.append({"example": example, "protocol": "median step",
                 **{f"{name}_step_ms": 1e3 * t for name, t in medians.items()},
                 "speedup": medians["flax"] / medians["multirate"]})
    print(f"{example:8} median step: flax {1e3 * medians['flax']:.1f} ms, "
          f"multirate {1e3 * medians['multirate']:.1f} ms "
          f"({medians['flax'] / medians['multirate']:.2f}x)")
  write_json({"h": H, "momentum": MU, "k": K, "rows": rows}, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
