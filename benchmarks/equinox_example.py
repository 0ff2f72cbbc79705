"""The Equinox tutorial's step against its multirate conversions, on the digits.

The CNN, loss and AdamW(3e-4) of examples/mnist_equinox.py (Equinox's MNIST
tutorial run offline on the digits), one batch of 64 digits, three steps:

- ``filter_jit``: the tutorial's own step, ``eqx.filter_jit`` over
  ``eqx.filter_value_and_grad``, the baseline;
- ``equinox``: ``mo.equinox.train_step(loss, optim)`` on the whole model, as
  examples/mnist_equinox_multirate.py runs it;
- ``core``: ``mo.train_step`` on the model partitioned by hand
  (``eqx.partition(model, eqx.is_inexact_array)``, the static part closed
  over by the loss), what an Equinox user could write without the adapter.

Both multirate steps run ``mo.multirate(AdamW, period=5)`` with the head (the
last linear layer) fast. Median seconds per step over interleaved blocks of
whole cycles, after warm-up, and each multirate step's speed-up over the
baseline, in one process. With ``--trajectory`` it also checks that the two
multirate steps give bitwise the same parameters over two cycles.

Run from the repository root::

  python -m benchmarks.equinox_example --json benchmarks/results/equinox_example.json

Timings on a shared CPU vary with its load: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import multirate_optax as mo
from benchmarks._report import write_json
from benchmarks.flax_examples import K, load_example, median_steps


def steps(example):
  """The three step functions, each advancing its own model on one batch."""
  trainloader, _ = example.get_loaders()
  x, y = next(iter(trainloader))
  model = example.CNN(jax.random.key(example.SEED))
  plain = example.optim
  multirate = mo.multirate(
      plain, labels=mo.equinox.fast_by_where(lambda m: m.layers[-2]),
      period=K)

  @eqx.filter_jit
  def filter_jit_step(model, opt_state, x, y):
    loss_value, grads = eqx.filter_value_and_grad(example.loss)(model, x, y)
    updates, opt_state = plain.update(grads, opt_state,
                                      eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss_value

  params, static = eqx.partition(model, eqx.is_inexact_array)
  core_step = mo.train_step(
      lambda params, x, y: example.loss(eqx.combine(params, static), x, y),
      multirate)
  states = {
      "filter_jit": [model, plain.init(eqx.filter(model, eqx.is_array))],
      "equinox": [model, multirate.init(params)],
      "core": [params, multirate.init(params)]}
  runs = {"filter_jit": filter_jit_step,
          "equinox": mo.equinox.train_step(example.loss, multirate),
          "core": core_step}

  def advance(name):
    *states[name], loss = runs[name](*states[name], x, y)
    return loss

  return {name: (lambda name=name: advance(name)) for name in runs}, states


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--json", type=Path, default=None)
  args = parser.parse_args(argv)
  example = load_example("mnist_equinox")
  run, states = steps(example)
  # Two cycles from the same start: the adapter is the core step.
  for _ in range(2 * K):
    run["equinox"](), run["core"]()
  same = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(eqx.filter(states["equinox"][0], eqx.is_array)),
      jax.tree.leaves(states["core"][0])))
  medians = median_steps(run, args.repeats)
  base = medians["filter_jit"]
  rows = [{"step": name, "step_ms": 1e3 * t, "speedup": base / t}
          for name, t in medians.items()]
  print(f"{'step':12} {'ms/step':>8} {'speed-up':>8}   (k = {K}, fast = head, "
        f"{jax.default_backend()}, dispatch "
        f"{mo.resolve_dispatch('auto')})")
  for row in rows:
    print(f"{row['step']:12} {row['step_ms']:8.2f} {row['speedup']:8.2f}")
  print(f"equinox and core trajectories bitwise equal: {same}")
  write_json({"k": K, "fast": "head", "backend": jax.default_backend(),
              "repeats": args.repeats, "bitwise_equal_to_core": same,
              "rows": rows}, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
