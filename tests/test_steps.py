"""One behaviour battery over the core, Linen, NNX and Equinox train steps.

Each test runs for every flavour of step on the same MLP, optimizer and data
(tests/_steps.py), against the hand-written published algorithm where it checks
values, and probes the compiled programs where it checks the mechanism.
"""

import chex
import numpy as np
import optax
import pytest

from _models import batches, is_fast, mlp_loss, mlp_params
from _probes import count_compilations, count_host_reads, hlo_op_count
from _reference import multirate_sgd
from _steps import FLAVOURS, H, HARNESSES, MU, NNXHarness, train

STEPS = 22


@pytest.fixture(params=FLAVOURS)
def harness(request):
  """The harness class of one flavour of train step."""
  return HARNESSES[request.param]


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("period", [3, 5])
def test_cond_and_host_follow_the_published_algorithm(harness, period, drift):
  data = batches(STEPS)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=period, drift=drift, is_fast=is_fast)
  results = {}
  for dispatch in ("cond", "host"):
    run = harness(period, drift=drift, dispatch=dispatch)
    results[dispatch] = train(run, data)
    chex.assert_trees_all_close(results[dispatch], expected, rtol=1e-5, atol=1e-6)
    assert run.count() == STEPS
  # Both dispatch modes run the same per-phase computation.
  chex.assert_trees_all_equal(results["cond"], results["host"])


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_every_flavour_computes_the_same_bits(dispatch):
  data = batches(9)
  results = [train(HARNESSES[f](3, dispatch=dispatch), data) for f in FLAVOURS]
  for result in results[1:]:
    chex.assert_trees_all_equal(result, results[0])


def test_fast_program_has_no_backward_work_for_slow_layers(harness):
  run = harness(4, dispatch="host")
  batch = batches(1)[0]
  full, fast = run.program(batch, phase=0), run.program(batch, phase=1)
  # 3 layers: forward 3 dots; full backward 3 weight grads + 2 input grads;
  # head-only backward 1 weight grad.
  assert hlo_op_count(full, "dot") == 8
  assert hlo_op_count(fast, "dot") == 4
  full_flops = full.compile().cost_analysis()["flops"]
  assert fast.compile().cost_analysis()["flops"] < 0.75 * full_flops
  # Each phase's step knows which groups it updates: the slow optimizer's
  # gate is no conditional on the count (it would carry the slow state
  # through its branches), neither in a phase's program nor in a branch of
  # 'cond', which holds both phases in one program and picks one.
  for program in (full, fast):
    assert "conditional(" not in program.compile().as_text()
  assert run.program(batch).compile().as_text().count("conditional(") == 1
  with pytest.raises(ValueError, match=r"phase 2 is not a phase of "
                     r"MultirateTimetable\(period=4.*which has 2 \(0 to 1\)"):
    run.program(batch, phase=2)


@pytest.mark.parametrize("dispatch, programs", [("cond", 1), ("host", 2)])
def test_compiles_once_per_program_and_reads_nothing_back_per_step(
    harness, dispatch, programs):
  run = harness(3, dispatch=dispatch)
  data = batches(12)
  with count_compilations() as compiled:
    for batch in data[:2]:
      run.step(batch)
    after_two = compiled[0]
    with count_host_reads() as reads:
      for batch in data[2:]:
        loss = run.step(batch)
  assert after_two >= programs
  assert compiled[0] == after_two
  assert reads[0] == 0
  assert np.isfinite(float(loss))


def test_host_count_follows_a_state_it_did_not_return(harness):
  data = batches(8)
  want = train(harness(4, dispatch="cond"), data)
  run = harness(4, dispatch="host")
  first = train(run, data[:1])
  saved = run.snapshot()
  train(run, data[1:6])
  # Rewound, as if restored from a checkpoint: count 1 (a fast step), new
  # arrays; the host count must follow it, not its own count of 6.
  run.rewind(saved)
  rest = train(run, data[1:])
  chex.assert_trees_all_equal(first + rest, want)


def test_apply_inside_your_own_jit_is_the_cond_step(harness):
  data = batches(8)
  want = train(harness(3, dispatch="cond"), data)
  run = harness(3, dispatch="host")
  got = []
  for batch in data:
    # Built for 'host' dispatch, run as 'cond': it says so.
    with pytest.warns(UserWarning, match=r"apply runs every phase in one "
                      r"lax.switch program.*dispatch='cond'") as caught:
      run.step_inside_jit(batch)
    got.append(run.params())
    # The way to keep host dispatch inside one's own jit is named only by the
    # adapter that has one (NNX's nnx.jit), not by Linen's or Equinox's step.
    message = str(caught[0].message)
    assert ("multirate_optax.nnx.jit" in message) == (harness is NNXHarness)
  chex.assert_trees_all_equal(got, want)


class TestRefusals:

  def test_host_step_inside_your_own_jit(self, harness):
    run = harness(3, dispatch="host")
    with pytest.raises(TypeError, match=r"inside a JAX transformation.*"
                       r"dispatch='cond'.*\.apply"):
      run.step_inside_jit(batches(1)[0], method="__call__")

  def test_state_whose_buffers_were_donated(self, harness):
    run = harness(3, dispatch="host", donate=True)
    data = batches(3)
    run.step(data[0])
    consumed = run.snapshot(copy=False)
    run.step(data[1])
    run.rewind(consumed)
    with pytest.raises(ValueError, match="already donated.*donate=False"):
      run.step(data[2])

  def test_without_donation_earlier_states_stay_usable(self, harness):
    data = batches(4)
    want = train(harness(3, dispatch="host"), data)
    run = harness(3, dispatch="host", donate=False)
    first = train(run, data[:2])
    kept = run.snapshot(copy=False)
    train(run, data[2:])
    run.rewind(kept)
    chex.assert_trees_all_equal(first + train(run, data[2:]), want)

  @pytest.mark.parametrize("wrap", [
      lambda tx: optax.apply_if_finite(tx, 3),
      lambda tx: optax.MultiSteps(tx, 2),
      lambda tx: optax.conditionally_mask(tx, lambda count: count % 2 == 0),
  ], ids=["apply_if_finite", "MultiSteps", "conditionally_mask"])
  def test_host_dispatch_inside_a_wrapper_that_skips_updates(self, harness, wrap):
    run = harness(2, dispatch="host", wrap=wrap)
    with pytest.raises(ValueError, match="not known to advance it once per "
                       "step.*use dispatch='cond'"):
      run.step(batches(1)[0])
