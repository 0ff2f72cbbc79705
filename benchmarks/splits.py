"""Which fast set to pick: :func:`multirate_optax.profile_splits` on the
fine-tuning experiment's pretrained models, and a check of its prediction.

``--model efficientnet`` profiles EfficientNet-Lite0 (ImageNet weights, 32x32
images, BatchNorm frozen, as :mod:`experiments.finetune.tasks.vision`),
``--model minilm`` all-MiniLM-L6-v2 (48 tokens, as
:mod:`experiments.finetune.tasks.text`), at the experiment's batch size, with
the experiment's fast sets and a few deeper ones. It prints the profiler's
table and writes it as JSON.

``--check K`` then measures what the profiler predicts: multirate steps with
fast = classifier and period K (the library's train step, ``'host'``
dispatch, donating) against full steps (the same step's all-active program,
every step), in whole cycles, blocks interleaved, and reports the measured
speed-up beside the predicted one.

Run from the repository root, on one core of a shared machine::

  taskset -c 0 python -m benchmarks.splits --model minilm --check 5

The batch is random (inputs of the right shapes): time does not depend on
the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json

RESULTS = Path(__file__).parent / "results"
CLASSIFIER = "^classifier/"


def _one_of(names) -> str:
  return "^(" + "|".join(names) + ")/"


def efficientnet():
  """(loss_fn, params, batch, candidates) of the vision task's model."""
  from experiments.finetune.tasks import vision
  settings = vision.FULL
  model, variables = vision.fresh_variables(
      vision.load_pretrained_efficientnet_lite0(), 0, 10)
  loss = vision.make_loss(model, settings)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  key = jax.random.key(0)
  size = settings.image_size
  batch = (jax.random.uniform(key, (settings.batch_size, size, size, 3)),
           jnp.arange(settings.batch_size) % 10)

  def loss_fn(params, batch):
    return loss(params, state, *batch, key, 0)[0]

  stages = vision.stage_block_names
  candidates = {
      "classifier": CLASSIFIER,
      "head + classifier": _one_of(("head", "classifier")),
      "last stage + head": _one_of(vision.LAST_STAGE_AND_HEAD),
      "last 2 stages + head": _one_of(
          (*stages(-2), *vision.LAST_STAGE_AND_HEAD)),
  }
  return loss_fn, params, batch, candidates


def minilm():
  """(loss_fn, params, batch, candidates) of the text task's model."""
  from experiments.finetune.tasks import text
  settings = text.FULL
  model, variables = text.fresh_variables(text.load_pretrained_minilm(), 0, 2)
  loss = text.make_loss(model, settings)
  key = jax.random.key(0)
  shape = (settings.batch_size, settings.max_length)
  ids = jax.random.randint(key, shape, 1000, 30000)
  batch = (jnp.stack([ids, jnp.ones(shape, ids.dtype)], axis=1),
           jnp.arange(settings.batch_size) % 2)

  def loss_fn(params, batch):
    return loss(params, {}, *batch, key, 0)[0]

  candidates = {"classifier": CLASSIFIER}
  for n in (1, 2, 3):
    layers = tuple(f"layer_{5 - i}" for i in range(n))
    candidates[f"last {n} layer(s) + head"] = _one_of((*layers, "classifier"))
  return loss_fn, variables["params"], batch, candidates


MODELS = {"efficientnet": efficientnet, "minilm": minilm}
# Wall-clock time, or the CPU time of this process (all its threads): on a
# CPU shared with other jobs the latter moves much less with their load.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def measure_speedup(loss_fn, params, batch, optimizer, period: int,
                    cycles: int, repeats: int,
                    timer=time.perf_counter) -> dict:
  """Measured time per step of multirate (fast = classifier) and full steps.

  Both are the library's train step with ``'host'`` dispatch, donating: the
  full one is multirate with period 1 (every step a slow step, training every
  leaf), so the two differ only in the period.
  """

  steps = cycles * period  # per block, for both runners

  def runner(period):
    tx = mo.multirate(optimizer, labels=mo.fast_by_path(CLASSIFIER),
                      period=period)
    step = mo.train_step(loss_fn, tx, dispatch="host", donate=True)
    state = [jax.tree.map(jnp.array, params)]
    state.append(tx.init(state[0]))

    def block() -> float:
      jax.block_until_ready(state)
      start = timer()
      for _ in range(steps):
        state[0], state[1], loss = step(state[0], state[1], batch)
      jax.block_until_ready(loss)
      return (timer() - start) / steps

    return block

  runners = {"multirate": runner(period), "full": runner(1)}
  times = {name: [] for name in runners}
  for block in runners.values():
    block()  # compiles and warms up every phase
  for _ in range(repeats):
    for name, block in runners.items():
      times[name].append(block())
  medians = {name: statistics.median(t) for name, t in times.items()}
  return {"period": period, "cycles_per_block": cycles, "repeats": repeats,
          "multirate_seconds": medians["multirate"],
          "full_seconds": medians["full"],
          "speedup": medians["full"] / medians["multirate"]}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), required=True)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--host-only", action="store_true",
                      help="skip the lax.switch ('cond') program")
  parser.add_argument("--check", type=int, metavar="K",
                      help="also measure multirate (fast = classifier) at "
                           "period K against full steps")
  parser.add_argument("--cycles", type=int, default=4,
                      help="--check: cycles per timed block")
  parser.add_argument("--check-repeats", type=int, default=7)
  parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                      help="time the profile and the check in wall-clock "
                      "time, or in CPU time of this process (steadier on a "
                      "shared CPU)")
  parser.add_argument("--json", type=Path, help="default: benchmarks/results/"
                      "splits_<model>_<backend>.json")
  args = parser.parse_args(argv)
  loss_fn, params, batch, candidates = MODELS[args.model]()
  optimizer = optax.sgd(1e-3, momentum=0.9)
  profile = mo.profile_splits(
      loss_fn, params, batch, candidates, optimizer=optimizer,
      repeats=args.repeats, timer=CLOCKS[args.clock],
      dispatches=("host",) if args.host_only else ("host", "cond"))
  print(profile)
  result = {"model": args.model, "clock": args.clock,
            "profile": profile.to_dict()}
  if args.check:
    measured = measure_speedup(loss_fn, params, batch, optimizer, args.check,
                               args.cycles, args.check_repeats,
                               CLOCKS[args.clock])
    split = next(s for s in profile.splits if s.name == "classifier")
    predicted = mo.predicted_speedup(profile.full.seconds, split.fast.seconds,
                                     args.check)
    measured["predicted_speedup"] = predicted
    measured["predicted_over_measured"] = predicted / measured["speedup"]
    result["check"] = measured
    print(f"fast = classifier, k = {args.check}: measured speed-up "
          f"{measured['speedup']:.3f} (full {measured['full_seconds'] * 1e3:.1f}"
          f" ms, multirate {measured['multirate_seconds'] * 1e3:.1f} ms per "
          f"step), predicted {predicted:.3f} ({predicted / measured['speedup'] - 1:+.1%})")
  path = args.json or RESULTS / f"splits_{args.model}_{jax.default_backend()}.json"
  write_json(result, path)
  return result


if __name__ == "__main__":
  main()
