"""Gradual unfreezing: timetable values, a hand-written loop, frozen groups, programs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import batches, mlp_loss, mlp_params
from _probes import count_compilations, hlo_op_count

ORDER = ("head", "layer1", "layer0")
GROUPS = {"layer0": "layer0", "layer1": "layer1", "head": "head"}


def test_timetable_phases_are_the_groups_unfrozen_so_far():
  timetable = mo.UnfreezingTimetable(ORDER, (0, 3, 7))
  assert timetable.phases == (frozenset({"head"}),
                              frozenset({"head", "layer1"}), frozenset(ORDER))
  expected = [0] * 3 + [1] * 4 + [2] * 5
  assert [timetable.phase(t) for t in range(12)] == expected
  np.testing.assert_array_equal(
      jax.jit(jax.vmap(timetable.phase))(jnp.arange(12)), expected)
  since = [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
  assert [timetable.steps_since_unfreezing(t) for t in range(12)] == since
  np.testing.assert_array_equal(
      jax.jit(jax.vmap(timetable.steps_since_unfreezing))(jnp.arange(12)),
      since)


def test_groups_joining_together_share_a_phase():
  timetable = mo.UnfreezingTimetable(ORDER, (0, 4, 4))
  assert timetable.phases == (frozenset({"head"}), frozenset(ORDER))
  assert mo.UnfreezingTimetable.every(ORDER, 5).unfreeze_steps == (0, 5, 10)


def unfreezing_sgd_reference(params, data, unfreeze_steps, *, lr, momentum,
                             discriminative, shape, restart):
  """ULMFiT's gradual unfreezing with SGD-momentum, in numpy.

  Group i (head first) trains from its unfreeze step on with rate
  lr * shape(s) / discriminative**i, s the step or, with restart, the steps
  since the latest unfreezing; its momentum changes only while it trains.
  """
  grad_fn = jax.jit(jax.grad(mlp_loss))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [mo.path_str(p) for p, _ in flat]
  index = {p: ORDER.index(p.split("/")[0]) for p in paths}
  theta = {p: np.asarray(v, np.float32) for p, (_, v) in zip(paths, flat)}
  buf = {p: np.zeros_like(v) for p, v in theta.items()}
  history = []
  for t, batch in enumerate(data):
    current = jax.tree.unflatten(treedef, [theta[p] for p in paths])
    grads = dict(zip(paths, map(np.asarray, jax.tree.leaves(
        grad_fn(current, batch)))))
    latest = max(s for s in unfreeze_steps if s <= t)
    s = t - latest if restart else t
    for p in paths:
      i = index[p]
      if t < unfreeze_steps[i]:
        continue
      rate = np.float32(lr * shape(s) / discriminative ** i)
      buf[p] = np.float32(momentum) * buf[p] + grads[p]
      theta[p] = theta[p] - rate * buf[p]
    history.append(jax.tree.unflatten(treedef, [theta[p].copy() for p in paths]))
  return history


def train(step, params, opt_state, data):
  history, states = [], []
  for batch in data:
    params, opt_state, _ = step(params, opt_state, batch)
    history.append(jax.tree.map(np.array, params))
    states.append(jax.tree.map(np.array, opt_state))
  return history, states


@pytest.mark.parametrize("discriminative, restart, dispatch", [
    (1.0, False, "host"), (2.6, False, "cond"), (2.6, True, "host"),
    (2.6, True, "cond")])
def test_training_follows_the_reference_loop(discriminative, restart, dispatch):
  unfreeze_steps = (0, 3, 7)
  data = batches(12)
  shape = lambda s: 1.0 / (1.0 + 0.25 * s)  # a decay that restarts visibly
  expected = unfreezing_sgd_reference(
      mlp_params(), data, unfreeze_steps, lr=0.2, momentum=0.9,
      discriminative=discriminative, shape=shape, restart=restart)
  tx = mo.gradual_unfreezing(
      optax.sgd(0.2, momentum=0.9), mo.UnfreezingTimetable(ORDER, unfreeze_steps),
      labels=GROUPS, discriminative=discriminative,
      schedule=lambda s: 1.0 / (1.0 + 0.25 * s.astype(jnp.float32)),
      restart=restart)
  params = mlp_params()
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  history, states = train(step, params, tx.init(params), data)
  chex.assert_trees_all_close(history, expected, rtol=2e-5, atol=1e-6)

  # Before its unfreeze step a group's weights and optimizer state are
  # bitwise those it started with; on that step they move.
  group_state = lambda state, g: state.inner.inner_states[g].inner_state
  initial_state = tx.init(params)
  for g, s in zip(ORDER, unfreeze_steps):
    for t in range(s):
      chex.assert_trees_all_equal(history[t][g], params[g])
      chex.assert_trees_all_equal(group_state(states[t], g),
                                  group_state(initial_state, g))
    assert not np.array_equal(history[s][g]["w"], np.asarray(params[g]["w"]))


def test_without_a_schedule_or_discrimination_a_group_is_the_optimizer_bitwise():
  # Once everything is unfrozen at step 0, unfreezing is the inner optimizer.
  data = batches(5)
  params = mlp_params()
  tx = mo.gradual_unfreezing(optax.adam(1e-2),
                             mo.UnfreezingTimetable(ORDER, (0, 0, 0)),
                             labels=GROUPS)
  got, _ = train(mo.train_step(mlp_loss, tx), params, tx.init(params), data)
  plain = optax.adam(1e-2)
  state, want = plain.init(params), []
  for batch in data:
    updates, state = plain.update(jax.grad(mlp_loss)(params, batch), state)
    params = optax.apply_updates(params, updates)
    want.append(params)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_each_phase_differentiates_the_unfrozen_groups_only():
  tx = mo.gradual_unfreezing(optax.sgd(0.1), mo.UnfreezingTimetable(
      ORDER, (0, 2, 4)), labels=GROUPS)
  params = mlp_params()
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  args = (params, tx.init(params), batches(1)[0])
  dots = [hlo_op_count(step.program(*args, phase=p), "dot") for p in range(3)]
  # Forward 3 dots; a weight gradient per unfrozen layer; input gradients
  # from the head down to the lowest unfrozen layer only.
  assert dots == [3 + 1, 3 + 2 + 1, 3 + 3 + 2]


def test_one_program_per_phase_and_no_recompilation():
  tx = mo.gradual_unfreezing(optax.sgd(0.1), mo.UnfreezingTimetable(
      ORDER, (0, 2, 5)), labels=GROUPS)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  data = batches(8)
  met = []
  with count_compilations() as compiled:
    for batch in data:
      params, opt_state, _ = step(params, opt_state, batch)
      met.append(compiled[0])
  assert met == [1, 1, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("traced", [False, True])
def test_keep_frozen_keeps_statistics_of_groups_not_yet_unfrozen(traced):
  timetable = mo.UnfreezingTimetable(ORDER, (0, 3, 6))
  groups = {"bn0": "layer0", "bn1": "layer1", "head": "head"}
  old = {"bn0": {"mean": jnp.zeros(2)}, "bn1": {"mean": jnp.zeros(3)}}
  new = {"bn0": {"mean": jnp.ones(2)}, "bn1": {"mean": jnp.ones(3)}}
  keep = lambda step: mo.keep_frozen(new, old, timetable, layers=groups,
                                     step=step)
  if traced:
    keep = jax.jit(keep)
  for step, bn0, bn1 in [(0, 0, 0), (2, 0, 0), (3, 0, 1), (5, 0, 1), (6, 1, 1)]:
    kept = keep(jnp.int32(step) if traced else step)
    np.testing.assert_array_equal(kept["bn0"]["mean"], np.full(2, bn0))
    np.testing.assert_array_equal(kept["bn1"]["mean"], np.full(3, bn1))
  with pytest.raises(ValueError, match="'bn0/mean' is labelled 'layer9'"):
    mo.keep_frozen(new, old, timetable, layers={"bn0": "layer9", "bn1": "head"},
                   step=0)


class TestBadInput:

  @pytest.mark.parametrize("order, steps, error, match", [
      (ORDER, (0, 5, 3), ValueError, r"'layer0' would join at step 3, before "
       r"'layer1' above it \(step 5\)"),
      (ORDER, (2, 3, 4), ValueError, "top group 'head' must train from step 0"),
      (ORDER, (0, 3), ValueError, "2 steps for the 3 groups"),
      (("head", "head"), (0, 1), ValueError, r"groups \['head'\] more than once"),
      ("head", (0,), TypeError, "sequence of group names"),
      (ORDER, (0, 1.5, 2), TypeError, "each unfreeze step must be an int"),
      (ORDER, (0, -1, 2), ValueError, "each unfreeze step must be an int >= 0"),
  ])
  def test_timetable(self, order, steps, error, match):
    with pytest.raises(error, match=match):
      mo.UnfreezingTimetable(order, steps)

  def test_a_group_without_parameters(self):
    tx = mo.gradual_unfreezing(optax.sgd(0.1), mo.UnfreezingTimetable(
        ORDER + ("embed",), (0, 1, 2, 3)), labels=GROUPS)
    with pytest.raises(ValueError, match=r"groups \['embed'\] of the timetable "
                       "have no parameters"):
      tx.init(mlp_params())

  def test_a_label_outside_the_order(self):
    tx = mo.gradual_unfreezing(optax.sgd(0.1), mo.UnfreezingTimetable(
        ORDER, (0, 1, 2)), labels=dict(GROUPS, head="top"))
    with pytest.raises(ValueError, match="'head/b' is labelled 'top'"):
      tx.init(mlp_params())

  def test_arguments(self):
    timetable = mo.UnfreezingTimetable(ORDER, (0, 1, 2))
    with pytest.raises(ValueError, match="discriminative must be > 0"):
      mo.gradual_unfreezing(optax.sgd(0.1), timetable, labels=GROUPS,
                            discriminative=0.0)
    with pytest.raises(ValueError, match="no schedule was given"):
      mo.gradual_unfreezing(optax.sgd(0.1), timetable, labels=GROUPS,
                            restart=True)
    with pytest.raises(TypeError, match="must be an UnfreezingTimetable"):
      mo.gradual_unfreezing(optax.sgd(0.1), mo.MultirateTimetable(2),
                            labels=GROUPS)

  def test_state_of_another_timetable(self):
    params = mlp_params()
    state = mo.gradual_unfreezing(optax.sgd(0.1), mo.UnfreezingTimetable(
        ORDER, (0, 1, 2)), labels=GROUPS).init(params)
    other = mo.gradual_unfreezing(optax.sgd(0.1), mo.UnfreezingTimetable(
        ORDER, (0, 2, 4)), labels=GROUPS)
    with pytest.raises(ValueError, match=r"made for UnfreezingTimetable\(.*"
                       r"unfreeze_steps=\(0, 1, 2\)\), but this optimizer "
                       r"follows UnfreezingTimetable\(.*\(0, 2, 4\)\)"):
      other.update(jax.tree.map(jnp.ones_like, params), state, params)
