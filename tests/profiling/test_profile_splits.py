"""profile_splits: the table's structure, its arithmetic, flops, safety, refusals.

No timing is asserted: only what holds on any machine.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo

WIDTHS = (8, 16, 16, 16, 4)  # four layers, sizes 128, 256, 256, 64


def make_problem():
  keys = jax.random.split(jax.random.key(0), len(WIDTHS))
  params = {f"layer_{i}": {"w": jax.random.normal(keys[i], (a, b)) / a ** .5}
            for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:]))}
  batch = (jax.random.normal(keys[-1], (32, WIDTHS[0])), jnp.zeros((32, 4)))

  def loss_fn(params, batch):
    x, y = batch
    for name in sorted(params):
      x = jnp.tanh(x @ params[name]["w"])
    return jnp.mean((x - y) ** 2)

  return loss_fn, params, batch


def profile(candidates=None, **kwargs):
  loss_fn, params, batch = make_problem()
  return mo.profile_splits(loss_fn, params, batch, candidates, repeats=1,
                           verbose=False, **kwargs)


def test_predicted_speedup_by_hand():
  # k t_full / (t_slow + (k - 1) t_fast): 5 * 2 / (2 + 4 * 0.5) = 2.5.
  assert mo.predicted_speedup(2.0, 0.5, 5) == 2.5
  # With the switch program's slow branch: 10 * 1 / (3 + 9 * 0.25) = 10 / 5.25.
  assert mo.predicted_speedup(1.0, 0.25, 10, t_slow=3.0) == 10 / 5.25
  assert mo.predicted_speedup(1.0, 1.0, 2) == 1.0


def test_table_structure_and_its_arithmetic():
  result = profile()
  assert result.backend == jax.default_backend()
  assert result.periods == (2, 5, 10)
  # Default candidates: fast_by_depth(n) for n = 1 .. 3 of 4 modules.
  assert [s.name for s in result.splits] == ["depth 1", "depth 2", "depth 3"]
  sizes = [a * b for a, b in zip(WIDTHS, WIDTHS[1:])]
  for n, split in enumerate(result.splits, start=1):
    assert split.fast_share == pytest.approx(sum(sizes[-n:]) / sum(sizes))
    # The speed-ups are the hand formula applied to the measured times.
    for k in (2, 5, 10):
      assert split.speedup_host[k] == pytest.approx(
          k * result.full.seconds
          / (result.full.seconds + (k - 1) * split.fast.seconds))
      assert split.speedup_cond[k] == pytest.approx(
          k * result.full.seconds
          / (split.cond_slow_seconds + (k - 1) * split.cond_fast_seconds))
    assert split.fast.bound_seconds == (
        split.fast.grad_seconds + split.fast.update_seconds)
    assert split.fast.overhead == pytest.approx(
        split.fast.seconds / split.fast.bound_seconds - 1)
    assert split.fast.peak_bytes > 0
  text = str(result)
  assert "depth 1" in text and "host k=5" in text and "cond k=5" in text
  loaded = json.loads(result.to_json())
  assert loaded == json.loads(json.dumps(result.to_dict()))
  assert [s["name"] for s in loaded["splits"]] == ["depth 1", "depth 2",
                                                   "depth 3"]
  assert set(loaded["splits"][0]["speedup_host"]) == {"2", "5", "10"}
  assert loaded["full"]["bound_seconds"] == result.full.bound_seconds


def test_timer_times_every_program():
  # A clock that advances one second per reading: every timed call lasts 1 s.
  readings = itertools.count()

  def ticking():
    return float(next(readings))

  result = profile(timer=ticking)
  assert result.clock == "ticking" and result.to_dict()["clock"] == "ticking"
  assert "(ticking)" in str(result)
  assert result.forward_seconds == result.full.seconds == 1.0
  for split in result.splits:
    assert (split.fast.seconds, split.fast.grad_seconds,
            split.fast.update_seconds, split.cond_slow_seconds,
            split.cond_fast_seconds) == (1.0,) * 5
    assert split.fast.bound_seconds == 2.0 and split.fast.overhead == -0.5
    assert split.speedup_host == split.speedup_cond == {2: 1.0, 5: 1.0,
                                                        10: 1.0}


def test_host_only_leaves_cond_out():
  result = profile(dispatches=("host",), periods=(3,))
  split = result.splits[0]
  assert split.cond_slow_seconds is None and split.speedup_cond == {}
  assert set(split.speedup_host) == {3}
  assert "cond" not in str(result)


def test_fast_flops_grow_with_depth():
  flops = [s.fast.flops for s in profile(dispatches=("host",)).splits]
  full = profile(dispatches=("host",)).full.flops
  assert flops[0] < flops[1] < flops[2] < full


def test_candidates_by_regex_labels_function_and_label_tree():
  _, params, _ = make_problem()
  tree = jax.tree.map(lambda _: "slow", params)
  tree["layer_3"]["w"] = "fast"
  result = profile({"regex": "layer_3", "function": mo.fast_by_depth(1),
                    "tree": tree}, dispatches=("host",))
  assert [s.name for s in result.splits] == ["regex", "function", "tree"]
  # One fast set three ways: one program, the same flops.
  assert len({s.fast.flops for s in result.splits}) == 1
  assert len({s.fast_share for s in result.splits}) == 1


def test_params_and_batch_unchanged_and_not_donated():
  loss_fn, params, batch = make_problem()
  before = jax.tree.map(np.asarray, (params, batch))
  mo.profile_splits(loss_fn, params, batch, ["layer_3"], repeats=1,
                    verbose=False)
  for leaf, copy in zip(jax.tree.leaves((params, batch)),
                        jax.tree.leaves(before)):
    assert not leaf.is_deleted()
    np.testing.assert_array_equal(np.asarray(leaf), copy)


def test_bad_candidates_refused():
  with pytest.raises(ValueError, match="'nothing' leaves no parameter fast"):
    profile({"nothing": "no_such_layer"})
  with pytest.raises(ValueError, match="'everything' leaves no parameter slow"):
    profile({"everything": "layer"})
  _, params, _ = make_problem()
  with pytest.raises(ValueError, match="labels leaves 'quick'"):
    profile({"typo": jax.tree.map(lambda _: "quick", params)})
  with pytest.raises(ValueError, match="structure of the parameters"):
    profile({"short": {"layer_0": "fast"}})
  with pytest.raises(TypeError, match="wrap a single one in a list"):
    profile("layer_3")
  with pytest.raises(ValueError, match="candidates is empty"):
    profile([])
  with pytest.raises(ValueError, match="dispatches must name"):
    profile(["layer_3"], dispatches=("device",))
  with pytest.raises(ValueError, match="periods must be at least 2"):
    profile(["layer_3"], periods=(1,))


def test_default_candidates_need_top_level_modules():
  loss_fn = lambda params, x: jnp.sum(x @ params)
  with pytest.raises(ValueError, match="pass candidates"):
    mo.profile_splits(loss_fn, jnp.ones((2, 2)), jnp.ones((1, 2)))


def test_custom_optimizer_and_aux():
  loss_fn, params, batch = make_problem()
  result = mo.profile_splits(lambda p, b: (loss_fn(p, b), 0.0), params, batch,
                             ["layer_3"], optimizer=optax.adam(1e-3),
                             has_aux=True, repeats=1, verbose=False,
                             dispatches=("host",))
  assert result.splits[0].fast.flops < result.full.flops
