"""The train step inside jax.pmap: gradients averaged over the named axis, or
refused; never replicas that silently drift apart.

Runs in a subprocess with 2 emulated CPU devices (the device count is fixed
when JAX starts).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
import multirate_optax as mo
from _models import HEAD_FAST, batches, mlp_loss, mlp_params

assert jax.device_count() == 2
tx = mo.multirate(optax.sgd(0.1, momentum=0.9), labels=HEAD_FAST, period=3)
params = mlp_params()
data = batches(7, batch_size=8)
out = {}

# The reference: one device, the whole batch.
step = mo.train_step(mlp_loss, tx, dispatch="cond")
p, s = params, tx.init(params)
for batch in data:
  p, s, _ = step(p, s, batch)
want = p

def replicate(tree):
  return jax.tree.map(lambda x: jnp.stack([x, x]), tree)

def shard(batch):
  return jax.tree.map(lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:]),
                      batch)

averaged = mo.train_step(mlp_loss, tx, dispatch="cond", axis_name="batch")
pstep = jax.pmap(lambda p, s, b: averaged.apply(p, s, b), axis_name="batch")
p, s = replicate(params), replicate(tx.init(params))
for batch in data:
  p, s, _ = pstep(p, s, shard(batch))
leaves = jax.tree.leaves(p)
out["replicas_equal"] = all(np.array_equal(x[0], x[1]) for x in leaves)
out["max_error"] = max(float(jnp.max(jnp.abs(x[0] - y)))
                       for x, y in zip(leaves, jax.tree.leaves(want)))

unaveraged = mo.train_step(mlp_loss, tx, dispatch="cond")
try:
  jax.pmap(lambda p, s, b: unaveraged.apply(p, s, b), axis_name="batch")(
      replicate(params), replicate(tx.init(params)), shard(data[0]))
  out["refused"] = None
except ValueError as error:
  out["refused"] = str(error)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pmap_run():
  helpers = str(Path(__file__).resolve().parents[1])
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join(
             filter(None, [helpers, os.environ.get("PYTHONPATH")]))}
  done = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_replicas_take_the_full_batch_step(pmap_run):
  assert pmap_run["replicas_equal"]
  assert pmap_run["max_error"] < 1e-5


def test_a_step_without_axis_name_under_pmap_is_refused(pmap_run):
  message = pmap_run["refused"]
  assert message is not None
  assert "axis_name" in message and "Mesh" in message
