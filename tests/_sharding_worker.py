"""Multi-device runs for tests/core/test_sharding.py, in a process with 8 CPU devices.

Run as ``python tests/_sharding_worker.py OUT``: trains the test MLP on a
4 x 2 mesh ('data' x 'model') and on one device, and writes what it measured
to the JSON file OUT for the test to check. Beyond its set-up it asserts
nothing, so that each property fails in its own test.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import json
import re
import sys
import tempfile

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import multirate_optax as mo
from multirate_optax import checkpoint
from _models import HEAD_FAST, batches, mlp_loss, mlp_params

PERIOD, STEPS, SAVE_AT, BATCH = 3, 8, 4, 16


def param_spec(leaf):
  """Shards each layer's output features over 'model' where they divide evenly."""
  if leaf.shape[-1] % 2 == 0:
    return P(*([None] * (leaf.ndim - 1)), "model")
  if leaf.ndim == 2:  # The head's 3 outputs: shard its input features instead.
    return P("model", None)
  return P()


def make_optimizer(drift):
  return mo.multirate(optax.adam(1e-2), optax.sgd(0.05, momentum=0.9),
                      labels=HEAD_FAST, period=PERIOD, drift=drift)


def sharded_state(mesh, tx):
  """The recipe of docs/guides/multi_device.md: shard params, init eagerly, replicate the rest."""
  params = jax.device_put(mlp_params(), jax.tree.map(
      lambda leaf: NamedSharding(mesh, param_spec(leaf)), mlp_params()))
  opt_state = tx.init(params)  # zeros_like keeps each parameter's sharding.
  replicated = NamedSharding(mesh, P())
  opt_state = jax.tree.map(
      lambda x: x if x.committed else jax.device_put(x, replicated), opt_state)
  return params, opt_state


def shardings(tree):
  return [leaf.sharding for leaf in jax.tree.leaves(tree)]


def same_shardings(got, want, tree):
  return all(g.is_equivalent_to(w, leaf.ndim)
             for g, w, leaf in zip(got, want, jax.tree.leaves(tree)))


def count_compilations():
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  return count


def dots(lowered):
  return len(re.findall(r"= \S+ dot\(", lowered.compile().as_text()))


def run_single_device(dispatch, drift, data):
  tx = make_optimizer(drift)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  history = []
  for batch in data:
    params, opt_state, loss = step(params, opt_state, batch)
    history.append((jax.tree.map(np.array, params), float(loss)))
  return history


def run_sharded(mesh, dispatch, drift, data, compilations, directory):
  """Trains on the mesh; returns the trajectory and what it observed."""
  tx = make_optimizer(drift)
  params, opt_state = sharded_state(mesh, tx)
  want_params, want_state = shardings(params), shardings(opt_state)
  batch_sharding = NamedSharding(mesh, P("data"))
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch, donate=True)
  facts = {"kept_shardings": True, "donated": True, "loss_replicated": True}
  history, compiles_per_step = [], []
  for t, batch in enumerate(data):
    if t == SAVE_AT:
      checkpoint.save(directory, t, {"params": params, "opt_state": opt_state})
    old = [(mo.path_str(path), leaf) for path, leaf in
           jax.tree_util.tree_flatten_with_path((params, opt_state))[0]]
    before = compilations[0]
    params, opt_state, loss = step(
        params, opt_state, jax.device_put(batch, batch_sharding))
    compiles_per_step.append(compilations[0] - before)
    # Donated, except the drift's held update on a slow step: that phase
    # overwrites it without reading it, and jit drops an unused argument
    # rather than donating it (the old buffer goes when the old state does).
    facts["donated"] &= all(leaf.is_deleted() or "/held/" in path
                            for path, leaf in old)
    facts["kept_shardings"] &= (
        same_shardings(shardings(params), want_params, params) and
        same_shardings(shardings(opt_state), want_state, opt_state))
    facts["loss_replicated"] &= loss.sharding.is_fully_replicated
    history.append((jax.tree.map(np.array, params), float(loss)))
  facts["compiles_per_step"] = compiles_per_step
  facts["param_specs"] = {
      mo.path_str(path): str(leaf.sharding.spec)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

  # Resume on the mesh from the mid-cycle checkpoint (with 'host' dispatch, the
  # step re-reads its count from the restored state).
  target = dict(zip(("params", "opt_state"), sharded_state(mesh, tx)))
  restored = checkpoint.restore(directory, target)
  facts["restored_shardings"] = same_shardings(
      shardings(restored), shardings(target), target)
  params, opt_state = restored["params"], restored["opt_state"]
  for batch in data[SAVE_AT:]:
    params, opt_state, _ = step(
        params, opt_state, jax.device_put(batch, batch_sharding))
  facts["resume_bitwise"] = all(
      np.array_equal(np.asarray(a), b) and np.asarray(a).dtype == b.dtype
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(history[-1][0])))

  batch = jax.device_put(data[0], batch_sharding)
  if dispatch == "host":
    facts["dots"] = {"full": dots(step.program(params, opt_state, batch, phase=0)),
                     "fast": dots(step.program(params, opt_state, batch, phase=1))}

  # A full cycle more, with programs already compiled: no value comes back.
  try:
    with jax.transfer_guard_device_to_host("disallow"):
      for batch in data[:PERIOD]:
        params, opt_state, _ = step(
            params, opt_state, jax.device_put(batch, batch_sharding))
    facts["no_transfer_to_host"] = True
  except Exception:  # The guard's error on a device-to-host transfer.
    facts["no_transfer_to_host"] = False
  return history, facts


def max_abs_difference(history, reference):
  params_diff = max(
      float(np.max(np.abs(a - b))) for (p, _), (q, _) in zip(history, reference)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
  loss_diff = max(abs(l - m) for (_, l), (_, m) in zip(history, reference))
  return max(params_diff, loss_diff)


def run_explicit_data_parallel(dispatch, data, reference):
  """Data parallel on a mesh with Explicit axes (jax.make_mesh's default)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  tx = make_optimizer(False)
  params = jax.device_put(mlp_params(), NamedSharding(mesh, P()))
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  history = []
  with jax.set_mesh(mesh):
    for batch in data:
      params, opt_state, loss = step(
          params, opt_state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
      history.append((jax.tree.map(np.array, params), float(loss)))
  return max_abs_difference(history, reference)


def main(out):
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))
  data = batches(STEPS, batch_size=BATCH)
  compilations = count_compilations()
  results = {}
  for dispatch in ("cond", "host"):
    for drift in (False, True):
      reference = run_single_device(dispatch, drift, data)
      with tempfile.TemporaryDirectory() as directory:
        history, facts = run_sharded(mesh, dispatch, drift, data, compilations,
                                     directory)
      facts["max_abs_difference"] = max_abs_difference(history, reference)
      if not drift:
        facts["explicit_data_parallel_max_abs_difference"] = (
            run_explicit_data_parallel(dispatch, data, reference))
      results[f"{dispatch}/{'drift' if drift else 'nodrift'}"] = facts
  with open(out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
