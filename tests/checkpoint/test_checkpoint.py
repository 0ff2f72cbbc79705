"""Checkpoint and resume: bitwise-identical continuation, refusal of other schedules.

Run as a script (``python tests/checkpoint/test_checkpoint.py DIR OUT``, with
tests/ on ``PYTHONPATH``), this file is the fresh process that restores the
checkpoints in DIR, continues training and writes the trajectories to OUT.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import multirate_optax as mo
from multirate_optax import checkpoint
from _models import HEAD_FAST, batches, mlp_loss, mlp_params

PERIOD, STEPS, SAVE_AT = 3, 11, 5  # 5 % 3 == 2: the checkpoint is mid-cycle.
assert SAVE_AT % PERIOD != 0
CONFIGS = [(dispatch, drift) for dispatch in ("cond", "host")
           for drift in (False, True)]


def config_name(dispatch, drift):
  return f"{dispatch}-{'drift' if drift else 'nodrift'}"


def make_optimizer(period=PERIOD, drift=False, labels=HEAD_FAST):
  return mo.multirate(optax.adam(1e-2), optax.sgd(0.05, momentum=0.9),
                      labels=labels, period=period, drift=drift)


def initial_state(tx):
  """A whole training state: params, optimizer state, a mutable collection, rng."""
  params = mlp_params()
  return {"params": params, "opt_state": tx.init(params),
          "batch_stats": {"mean": jnp.zeros(6)}, "rng": jax.random.key(0)}


def loss_fn(params, batch_stats, batch, rng):
  """MLP loss with input dropout and BatchNorm-like running statistics."""
  x, y = batch
  x = jnp.where(jax.random.bernoulli(rng, 0.9, x.shape), x / 0.9, 0.0)
  mean = 0.9 * batch_stats["mean"] + 0.1 * jnp.mean(x, axis=0)
  return mlp_loss(params, (x - mean, y)), {"mean": mean}


def advance(step, state, batch):
  rng, dropout_rng = jax.random.split(state["rng"])
  params, opt_state, (loss, batch_stats) = step(
      state["params"], state["opt_state"], state["batch_stats"], batch,
      dropout_rng)
  return {"params": params, "opt_state": opt_state,
          "batch_stats": batch_stats, "rng": rng}, loss


def snapshot(state, loss):
  """Every array of the state after a step, and its loss, as numpy copies."""
  leaves = jax.tree.leaves(
      {**state, "rng": jax.random.key_data(state["rng"]), "loss": loss})
  return [np.array(leaf) for leaf in leaves]


def train(step, state, data):
  history = []
  for batch in data:
    state, loss = advance(step, state, batch)
    history.append(snapshot(state, loss))
  return state, history


def assert_bitwise_equal(got, want):
  assert len(got) == len(want)
  for t, (got_step, want_step) in enumerate(zip(got, want)):
    assert len(got_step) == len(want_step)
    for a, b in zip(got_step, want_step):
      assert a.dtype == b.dtype and a.shape == b.shape, t
      assert a.tobytes() == b.tobytes(), f"step {t} differs"


def resume(directory, out):
  """The fresh process: restore each configuration, continue, save trajectories."""
  data = batches(STEPS)
  results = {}
  for dispatch, drift in CONFIGS:
    tx = make_optimizer(drift=drift)
    state = checkpoint.restore(f"{directory}/{config_name(dispatch, drift)}",
                               initial_state(tx))
    step = mo.train_step(loss_fn, tx, has_aux=True, dispatch=dispatch)
    _, history = train(step, state, data[SAVE_AT:])
    for t, arrays in enumerate(history):
      for i, array in enumerate(arrays):
        results[f"{config_name(dispatch, drift)}/{t}/{i}"] = array
  np.savez(out, **results)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
  data = batches(STEPS)
  uninterrupted, final = {}, {}
  for dispatch, drift in CONFIGS:
    tx = make_optimizer(drift=drift)
    step = mo.train_step(loss_fn, tx, has_aux=True, dispatch=dispatch)
    state, _ = train(step, initial_state(tx), data[:SAVE_AT])
    count = mo.find_timetable_state(state["opt_state"]).count
    assert int(count) == SAVE_AT
    assert checkpoint.save(tmp_path / config_name(dispatch, drift), SAVE_AT,
                           state)
    final[dispatch, drift], uninterrupted[dispatch, drift] = train(
        step, state, data[SAVE_AT:])

  out = tmp_path / "resumed.npz"
  # The tests' shared helpers (tests/_models.py) are one folder up.
  helpers = str(Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [helpers, os.environ.get("PYTHONPATH")]))}
  subprocess.run([sys.executable, __file__, str(tmp_path), str(out)],
                 check=True, timeout=120, env=env)
  resumed = np.load(out)
  for dispatch, drift in CONFIGS:
    want = uninterrupted[dispatch, drift]
    got = [[resumed[f"{config_name(dispatch, drift)}/{t}/{i}"]
            for i in range(len(want[t]))] for t in range(len(want))]
    assert_bitwise_equal(got, want)
  # Drift moves the slow layers differently: the configurations really differ.
  assert not np.array_equal(final["cond", True]["params"]["layer0"]["w"],
                            final["cond", False]["params"]["layer0"]["w"])


def test_host_step_rereads_its_count_from_a_restored_state(tmp_path):
  # The step object has taken 6 steps (next phase: slow) when it is handed a
  # state restored at step 4 (next phase: fast): it must follow the state.
  data = batches(6)
  tx = make_optimizer()
  step = mo.train_step(loss_fn, tx, has_aux=True, dispatch="host")
  with ocp.CheckpointManager(tmp_path) as manager:
    state, _ = train(step, initial_state(tx), data[:4])
    checkpoint.save(manager, 4, state)
    manager.wait_until_finished()
    _, want = train(step, state, data[4:])
    restored = checkpoint.restore(manager, initial_state(tx))
  assert manager.latest_step() == 4
  _, got = train(step, restored, data[4:])
  assert_bitwise_equal(got, want)


def test_restored_state_keeps_types_and_values(tmp_path, monkeypatch):
  tx = make_optimizer(drift=True)
  step = mo.train_step(loss_fn, tx, has_aux=True)
  state, _ = train(step, initial_state(tx), batches(2))
  saved = snapshot(state, jnp.zeros(()))
  monkeypatch.chdir(tmp_path)  # A relative directory works too.
  checkpoint.save("checkpoints", 2, state)
  restored = checkpoint.restore("checkpoints", initial_state(tx), step=2)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert_bitwise_equal([snapshot(restored, jnp.zeros(()))], [saved])


@pytest.fixture
def saved_period_3(tmp_path):
  checkpoint.save(tmp_path, SAVE_AT, initial_state(make_optimizer()))
  return tmp_path


def test_refuses_a_checkpoint_of_another_period(saved_period_3):
  target = initial_state(make_optimizer(period=4))
  with pytest.raises(ValueError, match=(
      r"another timetable: expected MultirateTimetable\(period=4\) \(the target "
      r"state's\), found MultirateTimetable\(period=3\) in the checkpoint")):
    checkpoint.restore(saved_period_3, target)


def test_refuses_a_checkpoint_with_other_labels(saved_period_3):
  # Orbax alone would restore this without error, leaving the optimizer
  # state of layer1 empty.
  labels = {"layer0": "slow", "layer1": "fast", "head": "fast"}
  target = initial_state(make_optimizer(labels=labels))
  with pytest.raises(ValueError, match=(
      r"other labels: 2 of 6 parameter leaves are in another group "
      r"\('layer1/b': expected 'fast', found 'slow'; "
      r"'layer1/w': expected 'fast', found 'slow'\)")):
    checkpoint.restore(saved_period_3, target)


def test_names_leaves_by_index_without_a_params_entry(tmp_path):
  tx = make_optimizer()
  params = mlp_params()
  checkpoint.save(tmp_path, 0, {"weights": params, "opt": tx.init(params)})
  other = make_optimizer(labels={"layer0": "fast", "layer1": "slow",
                                 "head": "fast"})
  with pytest.raises(ValueError, match=(
      r"\(leaf 2: expected 'fast', found 'slow'; "
      r"leaf 3: expected 'fast', found 'slow'\)")):
    checkpoint.restore(tmp_path, {"weights": params, "opt": other.init(params)})


def test_timetable_from_for_states_without_the_schedule_node(tmp_path):
  # nnx.state(optimizer) flattens the schedule's static data away; the
  # schedule then comes from the object given as timetable_from.
  tx = make_optimizer()
  opt_state = tx.init(mlp_params())
  flat = jax.tree.leaves(opt_state)
  with pytest.raises(ValueError, match="pass timetable_from="):
    checkpoint.save(tmp_path, 0, flat)
  checkpoint.save(tmp_path, 0, flat, timetable_from=opt_state)
  restored = checkpoint.restore(tmp_path, flat, timetable_from=opt_state)
  assert_bitwise_equal([[np.array(x) for x in restored]],
                       [[np.array(x) for x in flat]])
  other = make_optimizer(period=2).init(mlp_params())
  with pytest.raises(ValueError, match="another timetable"):
    checkpoint.restore(tmp_path, flat, timetable_from=other)


def test_refuses_a_checkpoint_without_multirate_metadata(tmp_path):
  state = initial_state(make_optimizer())
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state)))
  with pytest.raises(ValueError, match="not written by multirate_optax"):
    checkpoint.restore(tmp_path, state)


@pytest.mark.parametrize("damage, error", [
    (b"\xff\xfe\x00garbage", "UnicodeDecodeError"),
    (b'{"format": 2, "timet', "JSONDecodeError"),
    (b'["not", "an", "object"]', "expected a JSON object"),
    (b'{"format": 2}', "expected a JSON object with format, timetable"),
])
def test_damaged_metadata_names_the_file_and_step(saved_period_3, damage, error):
  metadata = saved_period_3 / str(SAVE_AT) / checkpoint._orbax.MULTIRATE_ITEM / "metadata"
  assert metadata.is_file()
  metadata.write_bytes(damage)
  with pytest.raises(ValueError, match=(
      rf"the checkpoint of step {SAVE_AT} in .* metadata in "
      rf"{re.escape(str(metadata))}.*{error}")):
    checkpoint.restore(saved_period_3, initial_state(make_optimizer()))


@pytest.fixture
def saved_two_steps(tmp_path):
  for step in (2, SAVE_AT):
    checkpoint.save(tmp_path, step, initial_state(make_optimizer()))
  return tmp_path


@pytest.mark.parametrize("damage, error", [
    (b"\xff\xfe\x00garbage", "UnicodeDecodeError"),
    (b'{"tree_metadata": {"par', "JSONDecodeError"),
])
@pytest.mark.parametrize("file", ["_METADATA", "array_metadatas"])
def test_damaged_orbax_metadata_names_the_file_and_step(saved_two_steps, file,
                                                        damage, error):
  # Orbax's own files of the state item: json's errors reached the user.
  item = saved_two_steps / str(SAVE_AT) / checkpoint._orbax.STATE_ITEM
  damaged = (item / file if file == "_METADATA"
             else sorted((item / file).iterdir())[0])
  damaged.write_bytes(damage)
  with pytest.raises(ValueError, match=(
      rf"the checkpoint of step {SAVE_AT} in .* has damaged orbax metadata in "
      rf"{re.escape(str(damaged))} \({error}: .*truncated or corrupted; "
      rf"restore another step \(the directory holds steps \[2\]")):
    checkpoint.restore(saved_two_steps, initial_state(make_optimizer()))
  # The other step is intact.
  checkpoint.restore(saved_two_steps, initial_state(make_optimizer()), step=2)


def _array_files(directory):
  item = Path(directory) / str(SAVE_AT) / checkpoint._orbax.STATE_ITEM
  return {"manifest": item / "manifest.ocdbt",
          "data": sorted((item / "d").iterdir())[0]}


@pytest.mark.parametrize("file, code", [("manifest", "DATA_LOSS"),
                                        ("data", "OUT_OF_RANGE")])
def test_damaged_array_files_name_the_file_and_step(saved_two_steps, file,
                                                    code):
  damaged = _array_files(saved_two_steps)[file]
  damaged.write_bytes(damaged.read_bytes()[:10])  # Truncated.
  with pytest.raises(ValueError, match=(
      rf"the checkpoint of step {SAVE_AT} in .* holds array data that cannot "
      rf"be read: {code} in {re.escape(str(damaged))} \(reading '.+'\): the "
      r"file is truncated or corrupted; restore another step")):
    checkpoint.restore(saved_two_steps, initial_state(make_optimizer()))


RESTORE_DAMAGED = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint import *
try:
  checkpoint.restore({directory!r}, initial_state(make_optimizer()))
except ValueError:
  pass
else:
  raise AssertionError("restored a damaged checkpoint")
checkpoint.restore({directory!r}, initial_state(make_optimizer()), step=2)
"""


def test_restoring_prints_no_asyncio_tracebacks(saved_two_steps):
  # When one read fails, orbax closed its event loop while the others were in
  # flight: each of them printed "RuntimeError: Event loop is closed" (or
  # "Task exception was never retrieved") from tensorstore's threads.
  data = _array_files(saved_two_steps)["data"]
  data.write_bytes(data.read_bytes()[:10])
  tests = str(Path(__file__).resolve().parent)
  helpers = str(Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [helpers, os.environ.get("PYTHONPATH")]))}
  done = subprocess.run(
      [sys.executable, "-c", RESTORE_DAMAGED.format(
          tests=tests, directory=str(saved_two_steps))],
      capture_output=True, text=True, timeout=120, env=env)
  assert done.returncode == 0, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  assert "Event loop is closed" not in done.stderr, done.stderr


def test_no_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path, initial_state(make_optimizer()))


if __name__ == "__main__":
  resume(*sys.argv[1:])
