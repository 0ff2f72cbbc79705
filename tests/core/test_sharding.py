"""Multi-device training: the unchanged train step on a 'data' x 'model' mesh.

The runs happen in a subprocess with 8 CPU devices (tests/_sharding_worker.py),
so that the rest of the suite keeps one device; each test checks one of the
facts it reports.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNS = ["cond/nodrift", "cond/drift", "host/nodrift", "host/drift"]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "facts.json"
  worker = Path(__file__).parents[1] / "_sharding_worker.py"
  subprocess.run([sys.executable, str(worker), str(out)], check=True,
                 timeout=300)
  return json.loads(out.read_text())


@pytest.mark.parametrize("run", RUNS)
def test_matches_the_single_device_run(facts, run):
  # Same maths, other reduction order (batch split over 'data', matmuls split
  # over 'model'): equal up to float32 rounding.
  difference = facts[run]["max_abs_difference"]
  assert difference < 1e-5, f"{run}: max abs difference {difference}"


@pytest.mark.parametrize("run", RUNS)
def test_outputs_keep_the_input_shardings(facts, run):
  assert facts[run]["kept_shardings"]
  assert facts[run]["loss_replicated"]
  specs = facts[run]["param_specs"]
  assert specs["layer0/w"] == "P(None, 'model')"
  assert specs["head/w"] == "P('model',)"
  assert specs["head/b"] == "P()"


@pytest.mark.parametrize("run", RUNS)
def test_sharded_buffers_are_donated(facts, run):
  assert facts[run]["donated"]


@pytest.mark.parametrize("run", RUNS)
def test_compiles_each_program_once(facts, run):
  # Step 0 is slow, step 1 fast: 'host' has met both of its programs by then.
  first_steps = 1 if run.startswith("cond") else 2
  assert all(facts[run]["compiles_per_step"][:first_steps])
  assert not any(facts[run]["compiles_per_step"][first_steps:])


@pytest.mark.parametrize("run", RUNS)
def test_no_device_to_host_transfer_per_step(facts, run):
  assert facts[run]["no_transfer_to_host"]


@pytest.mark.parametrize("run", ["host/nodrift", "host/drift"])
def test_sharded_fast_program_has_no_backward_work_for_slow_layers(facts, run):
  # As on one device (tests/core/test_train_step.py): 3 forward dots; the full
  # backward adds 3 weight and 2 input gradients, the fast one 1 weight gradient.
  assert facts[run]["dots"] == {"full": 8, "fast": 4}


@pytest.mark.parametrize("run", RUNS)
def test_checkpoint_restores_sharded_and_resumes_bitwise(facts, run):
  assert facts[run]["restored_shardings"]
  assert facts[run]["resume_bitwise"]


@pytest.mark.parametrize("run", ["cond/nodrift", "host/nodrift"])
def test_data_parallel_on_a_mesh_with_explicit_axes(facts, run):
  difference = facts[run]["explicit_data_parallel_max_abs_difference"]
  assert difference < 1e-5, f"{run}: max abs difference {difference}"
