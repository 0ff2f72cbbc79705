"""Issue 19's timetables in the vision task: each method builds the library's
optimizer it names, on the real EfficientNet-Lite0 parameter tree.

The expected groups, periods, unfreeze steps and depths are written out here
from the module names, independently of the task's helpers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.data import load_digits_splits
from experiments.finetune.settings import Method, leaf_paths, top_module
from experiments.finetune.tasks import VISION
from experiments.finetune.training import at_count, phase_steps
import multirate_optax as mo

LAST = {"blocks_15", "head"}
MIDDLE = {f"blocks_{i}" for i in range(5, 15)}  # Stages 4-6.
# LLRD depth per top-level module: classifier 0, head and last stage 1,
# then one per stage down, the stem 8.
STAGES = [["blocks_0"], ["blocks_1", "blocks_2"], ["blocks_3", "blocks_4"],
          ["blocks_5", "blocks_6", "blocks_7"],
          ["blocks_8", "blocks_9", "blocks_10"],
          ["blocks_11", "blocks_12", "blocks_13", "blocks_14"], ["blocks_15"]]
DEPTH = {"classifier": 0, "head": 1, "stem": 8,
         **{m: 7 - s for s, ms in enumerate(STAGES) for m in ms}}


def _params(efficientnet_params):
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), efficientnet_params)


def _optimizer(name, rates, steps=100, fraction=1.0):
  method = dataclasses.replace(VISION.method(name), budget_fraction=fraction)
  return method, VISION.make_optimizer(method, rates, VISION.quick, steps)


def test_three_rates_labels_and_periods(efficientnet_params):
  method, tx = _optimizer("multirate_three_rates",
                          {"fast_learning_rate": 0.003,
                           "slow_learning_rate": 0.003})
  state = mo.find_timetable_state(jax.eval_shape(tx.init, efficientnet_params))
  assert state.timetable == mo.MultirateGroupsTimetable(
      (("classifier", 1), ("last_stage", 2), ("rest", 6)))
  expected = tuple("classifier" if top_module(p) == "classifier" else
                   "last_stage" if top_module(p) in LAST else "rest"
                   for p in leaf_paths(efficientnet_params))
  assert state.labels == expected
  assert method.timetabled and not method.train_all
  assert method.period_in(VISION.quick) == 6  # Probes one whole cycle.
  assert len(state.timetable.phases) == 3


@pytest.mark.parametrize("name,factor,decay", [
    ("gradual_unfreezing", 1.0, 1.0),
    ("gradual_unfreezing_discriminative", 2.6, 1.0),
    ("gradual_unfreezing_llrd", 1.0, 0.8)])
def test_gradual_unfreezing_groups_steps_and_rates(efficientnet_params, name,
                                                   factor, decay):
  rate, fraction = 0.003, 0.5
  method, tx = _optimizer(name, {"learning_rate": rate}, fraction=fraction)
  params = _params(efficientnet_params)
  opt_state = tx.init(params)
  state = mo.find_timetable_state(opt_state)
  order = ("classifier", "last_stage", "middle", "bottom")
  train = len(load_digits_splits(image_size=32, seed=0).train.labels)
  nominal = round(fraction * VISION.quick.epochs * (train // 32))
  assert state.timetable == mo.UnfreezingTimetable(
      order, (0, nominal // 4, nominal // 2, 3 * nominal // 4))
  group = lambda p: ("classifier" if top_module(p) == "classifier" else
                     "last_stage" if top_module(p) in LAST else
                     "middle" if top_module(p) in MIDDLE else "bottom")
  paths = leaf_paths(params)
  assert state.labels == tuple(group(p) for p in paths)
  # First update (cosine factor 1, momentum trace = the gradient) at each
  # phase's first step: -rate / factor ** i (times decay ** depth with LLRD)
  # for the unfrozen group i, 0 for the frozen ones.
  grads = jax.tree.map(jnp.ones_like, params)
  for phase, count in enumerate(phase_steps(state.timetable)):
    updates, _ = tx.update(grads, at_count(opt_state, count), params)
    for path, update in zip(paths, jax.tree.leaves(updates)):
      i = order.index(group(path))
      expected = (-rate / factor ** i * decay ** DEPTH[top_module(path)]
                  if i <= phase else 0.0)
      np.testing.assert_allclose(np.asarray(update).ravel()[0], expected,
                                 rtol=1e-6, err_msg=path)


def _tiny_tree(efficientnet_params):
  """The real network's top-level modules, each a single 2-vector."""
  return {name: {"kernel": jnp.ones(2)} for name in efficientnet_params}


@pytest.mark.parametrize("name,periods,decay", [
    ("multirate_three_rates", {"classifier": 1, "last": 2, "rest": 6}, 1.0),
    ("multirate_three_rates_llrd", {"classifier": 1, "last": 2, "rest": 6},
     0.8),
    ("multirate_last_stage", {"classifier": 1, "last": 1, "rest": 5}, 1.0),
    ("multirate_last_stage_llrd", {"classifier": 1, "last": 1, "rest": 5},
     0.8)])
def test_multirate_updates_against_a_hand_written_loop(efficientnet_params,
                                                       name, periods, decay):
  """Twelve updates from a gradient of ones, on a tree of the network's
  top-level modules: each group's SGD momentum on the steps ``t % p == 0``
  (``m_n = sum_i 0.9 ** i`` after its n-th update), its cosine over its own
  updates (``steps / p`` of them), held and applied times ``1 / p`` on the
  p steps of its period (drift), times ``decay ** depth`` with LLRD."""
  fast, slow, steps, momentum = 0.003, 0.005, 60, VISION.quick.momentum
  method, tx = _optimizer(name, {"fast_learning_rate": fast,
                                 "slow_learning_rate": slow}, steps=steps)
  assert method.timetabled and not method.train_all
  assert (method.layerwise_decay is not None) == (decay != 1.0)
  params = _tiny_tree(efficientnet_params)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  group = lambda m: ("classifier" if m == "classifier" else
                     "last" if m in LAST else "rest")
  for t in range(12):
    updates, opt_state = update(grads, opt_state, params)
    for module, leaf in updates.items():
      p = periods[group(module)]
      rate = slow if group(module) == "rest" else fast
      n = t // p
      cosine = 0.5 * (1 + np.cos(np.pi * min(n / (steps / p), 1.0)))
      trace = sum(momentum ** i for i in range(n + 1))
      expected = -rate * cosine * trace / p * decay ** DEPTH[module]
      np.testing.assert_allclose(np.asarray(leaf["kernel"]), expected,
                                 rtol=1e-5, err_msg=f"{module} at step {t}")


def test_llrd_depths(efficientnet_params):
  rate = 0.003
  method, tx = _optimizer("train_all_llrd", {"learning_rate": rate})
  assert not method.train_all and not method.timetabled
  assert not dataclasses.replace(method, budget_fraction=1.0).train_all
  params = _params(efficientnet_params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params),
                         params)
  for path, update in zip(leaf_paths(params), jax.tree.leaves(updates)):
    np.testing.assert_allclose(np.asarray(update).ravel()[0],
                               -rate * 0.8 ** DEPTH[top_module(path)],
                               rtol=1e-6, err_msg=path)


def test_method_refuses_periods_without_their_timetable():
  with pytest.raises(ValueError, match="periods go with"):
    Method("x", "x", periods=(("a", 1),))
  with pytest.raises(ValueError, match="timetable of 'x'"):
    Method("x", "x", timetable="freeze")
