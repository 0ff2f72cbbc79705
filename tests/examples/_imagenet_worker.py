"""Runs of the ImageNet example pair for tests/examples/test_examples.py, on 2 CPU devices.

Run as ``python tests/examples/_imagenet_worker.py OUT`` (from the repository
root, with it on PYTHONPATH): runs examples/imagenet_linen.py and
examples/imagenet_linen_multirate.py under ``jax.pmap`` on 2 emulated CPU
devices and writes what it measured to the JSON file OUT:

- ``runs``: each example's ``train_and_evaluate`` for a few steps;
- ``first_step``: one step of each example's pmapped ``train_step`` from the
  same state on the same batch (float32, no warm-up, so the rate is not 0);
- ``half_precision``: a few steps of each with Flax's ``DynamicScale`` in the
  state (float16 model), one batch holding a NaN.

The model is Flax's ``_ResNet1`` (models.py's test model, one ResNet block),
4 filters wide: a ResNet18 takes a minute to compile here. Beyond its set-up it
asserts nothing, so that each property fails in its own test.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2")

import functools
import json
import sys
import time

import jax
import numpy as np
from flax import jax_utils
from flax.training import dynamic_scale as dynamic_scale_lib

from benchmarks.flax_examples import load_example

NAMES = ("imagenet_linen", "imagenet_linen_multirate")
BATCH, STEPS, NAN_AT, PERIOD = 16, 6, 3, 5
IMAGE_SIZE = 32


def small_config(module, **changes):
  config = module.get_config()
  config.model, config.num_filters = "_ResNet1", 4
  config.batch_size, config.train_size, config.num_epochs = BATCH, 4 * BATCH, 1
  config.steps_per_eval, config.log_every_steps = 2, 2
  for name, value in changes.items():
    setattr(config, name, value)
  return config


def tree_max_abs(tree):
  return max(float(np.max(np.abs(np.asarray(x, np.float64))))
             for x in jax.tree.leaves(tree))


def replicas_equal(tree):
  return all(np.array_equal(x[0], x[1]) for x in jax.tree.leaves(tree))


def first(tree):
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def replicated(state):
  # Through a pmap over 'batch', as the steps' outputs are: a state laid out
  # by jax_utils.replicate alone would compile each step a second time.
  return jax.pmap(lambda s: s, axis_name="batch")(jax_utils.replicate(state))


def set_up(module, config, dynamic_scale):
  model = module.create_model(model_cls=getattr(module, config.model),
                              half_precision=config.half_precision,
                              num_filters=config.num_filters)
  learning_rate_fn = module.create_learning_rate_fn(
      config, config.learning_rate * config.batch_size / 256.0, 4)
  state = module.create_train_state(jax.random.key(0), config, model,
                                    IMAGE_SIZE, learning_rate_fn)
  if dynamic_scale:
    # The example creates one on GPUs only; these runs are on CPUs.
    state = state.replace(dynamic_scale=dynamic_scale_lib.DynamicScale())
  p_train_step = jax.pmap(
      functools.partial(module.train_step, learning_rate_fn=learning_rate_fn),
      axis_name="batch")
  return replicated(state), p_train_step


def batches(module, config, steps):
  train_ds, _ = module.get_datasets(config, IMAGE_SIZE)
  dtype = np.float16 if config.half_precision else np.float32
  it = module.create_input_iter(train_ds, config.batch_size, dtype, train=True)
  return [next(it) for _ in range(steps)]


def main(out_path):
  assert jax.local_device_count() == 2
  modules = {name: load_example(name) for name in NAMES}
  out = {"runs": {}, "first_step": {}, "half_precision": {}, "wall": {}}
  start = time.perf_counter()

  for name, module in modules.items():
    state, seconds, accuracy = module.train_and_evaluate(
        small_config(module), workdir="")
    out["runs"][name] = {
        "step": int(state.step[0]), "seconds": seconds, "accuracy": accuracy,
        "replicas_equal": replicas_equal(
            (state.params, state.opt_state, state.batch_stats))}

  out["wall"]["runs"] = time.perf_counter() - start
  # One step from the same state on the same batch. With drift the slow
  # parameters move by 1 / PERIOD of the example's update on the slow step.
  config = small_config(modules[NAMES[0]], warmup_epochs=0.0)
  batch = batches(modules[NAMES[0]], config, 1)[0]
  results = {}
  for name, module in modules.items():
    state, p_train_step = set_up(module, config, dynamic_scale=False)
    new_state, metrics = p_train_step(state, batch)
    results[name] = (first(state), first(new_state), first(metrics),
                     replicas_equal((new_state.params, new_state.opt_state,
                                     new_state.batch_stats)))
  (before, want, want_metrics, _), (_, got, got_metrics, equal) = (
      results[name] for name in NAMES)
  moved = lambda s: jax.tree.map(lambda a, b: a - b, s.params, before.params)
  fast = lambda tree: {k: v for k, v in tree.items() if k.startswith("Dense")}
  slow = lambda tree: {k: v for k, v in tree.items()
                       if not k.startswith("Dense")}
  out["first_step"] = {
      "learning_rate": float(want_metrics["learning_rate"]),
      "fast_moved": tree_max_abs(fast(moved(want))),
      "slow_moved": tree_max_abs(slow(moved(want))),
      "fast_error": tree_max_abs(jax.tree.map(
          lambda a, b: a - b, fast(got.params), fast(want.params))),
      "slow_error": tree_max_abs(jax.tree.map(
          lambda a, b: PERIOD * a - b, slow(moved(got)), slow(moved(want)))),
      "batch_stats_error": tree_max_abs(jax.tree.map(
          lambda a, b: a - b, got.batch_stats, want.batch_stats)),
      "metrics_error": max(abs(float(got_metrics[k]) - float(want_metrics[k]))
                           for k in ("loss", "accuracy", "learning_rate")),
      "replicas_equal": equal,
  }

  out["wall"]["first_step"] = time.perf_counter() - start
  # Half precision: Flax's DynamicScale, a NaN in one batch.
  config = small_config(modules[NAMES[0]], half_precision=True)
  data = batches(modules[NAMES[0]], config, STEPS)
  data[NAN_AT]["image"][0, 0, 0, 0, 0] = np.nan
  for name, module in modules.items():
    state, p_train_step = set_up(module, config, dynamic_scale=True)
    history = []
    for batch in data:
      before = state
      state, metrics = p_train_step(state, batch)
      scale = first(state.dynamic_scale)
      history.append({
          "fin_steps": int(scale.fin_steps), "scale": float(scale.scale),
          "metrics_scale": float(metrics["scale"][0]),
          "params_kept": all(np.array_equal(a, b) for a, b in zip(
              jax.tree.leaves(before.params), jax.tree.leaves(state.params))),
      })
    out["half_precision"][name] = {
        "history": history,
        "replicas_equal": replicas_equal((state.params, state.opt_state,
                                          state.dynamic_scale)),
        "params_finite": all(np.isfinite(x).all()
                             for x in jax.tree.leaves(state.params)),
    }

  out["wall"]["half_precision"] = time.perf_counter() - start
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
