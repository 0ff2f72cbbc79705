"""The multirate transformation against a hand-written loop of the algorithm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import HEAD_FAST, batches, is_fast, mlp_loss, mlp_params
from _reference import multirate_sgd

H, MU, STEPS = 0.2, 0.9, 24


def run_optimizer(tx, params, grads_per_step):
  """Applies ``tx`` to the given gradients under jit; parameters after each step."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for grads in grads_per_step:
    params, state = step(params, state, grads)
    history.append(params)
  return history, state


def reference_and_grads(period, drift, steps=STEPS):
  """The reference trajectory and the full gradient at each of its steps."""
  params = mlp_params()
  data = batches(steps)
  history = multirate_sgd(params, mlp_loss, data, h=H, momentum=MU,
                          period=period, drift=drift, is_fast=is_fast)
  grad_fn = jax.jit(jax.grad(mlp_loss))
  grads = [grad_fn(p, b) for p, b in zip([params] + history[:-1], data)]
  return params, history, grads


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("period", [1, 2, 5])
def test_trajectory_equals_published_algorithm(period, drift):
  # XLA:CPU fuses `param + lr * momentum` into a fused multiply-add, which a
  # numpy loop does not, so agreement is to float32 rounding, not bitwise.
  params, expected, grads = reference_and_grads(period, drift)
  tx = mo.multirate(optax.sgd(H / period, momentum=MU),
                    optax.sgd(H, momentum=MU), labels=HEAD_FAST,
                    period=period, drift=drift)
  history, _ = run_optimizer(tx, params, grads)
  assert len(history) == STEPS
  chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
  # The slow parameters really follow the slow schedule: without drift they
  # are constant within a cycle, with drift they move on every step.
  moved = [not np.array_equal(a["layer0"]["w"], b["layer0"]["w"])
           for a, b in zip([params] + history[:-1], history)]
  assert moved == [drift or t % period == 0 for t in range(STEPS)]


@pytest.mark.parametrize("make_inner", [
    lambda: optax.sgd(0.05),
    lambda: optax.sgd(0.05, momentum=0.9),
    lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    lambda: optax.adam(1e-2),
])
def test_period_one_is_the_inner_optimizer_bitwise(make_inner):
  params, _, grads = reference_and_grads(1, False, steps=10)
  got, _ = run_optimizer(
      mo.multirate(make_inner(), labels=HEAD_FAST, period=1), params, grads)
  want, _ = run_optimizer(make_inner(), params, grads)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_off_steps_leave_slow_parameters_and_state_untouched():
  period = 3
  params, _, grads = reference_and_grads(period, False, steps=9)
  tx = mo.multirate(optax.adam(1e-2), labels=HEAD_FAST, period=period,
                    drift=False)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t, g in enumerate(grads):
    updates, new_state = update(g, state, params)
    slow_inner = lambda s: s.inner.inner_states["slow"].inner_state
    for name in ("layer0", "layer1"):
      for u in jax.tree.leaves(updates[name]):
        if t % period:
          np.testing.assert_array_equal(u, 0.0)
        else:
          assert np.all(np.asarray(u) != 0.0)
    if t % period:
      # Adam's moments and count: bitwise unchanged on fast steps.
      chex.assert_trees_all_equal(slow_inner(new_state), slow_inner(state))
    else:
      adam_state = slow_inner(new_state).inner[0]
      assert int(adam_state.count) == t // period + 1
    assert np.all(np.asarray(updates["head"]["w"]) != 0.0)
    params = optax.apply_updates(params, updates)
    state = new_state
  assert int(state.count) == len(grads)


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_state_structure_and_dtypes_are_stable(drift, dtype):
  params = mlp_params(dtype=dtype)
  tx = mo.multirate(optax.sgd(0.1, momentum=0.9), optax.adam(1e-3),
                    labels=HEAD_FAST, period=3, drift=drift)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(4):
    updates, new_state = update(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    params = optax.apply_updates(params, updates)
    state = new_state
  chex.assert_trees_all_equal_shapes_and_dtypes(params, mlp_params(dtype=dtype))


def test_fast_and_slow_optimizers_can_differ():
  params, _, grads = reference_and_grads(2, False, steps=4)
  tx = mo.multirate(optax.sgd(0.1), optax.sgd(0.0), labels=HEAD_FAST, period=2)
  history, _ = run_optimizer(tx, params, grads)
  chex.assert_trees_all_equal(history[-1]["layer0"], params["layer0"])
  assert not np.allclose(history[-1]["head"]["w"], params["head"]["w"])


@pytest.mark.parametrize("drift", [False, True])
def test_by_default_the_slow_part_moves_one_slow_update_per_cycle(drift):
  period = 4
  params, _, grads = reference_and_grads(period, drift, steps=period)
  tx = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=period,
                    drift=drift)
  history, _ = run_optimizer(tx, params, grads)
  # One step of sgd(0.1) per cycle, from the slow step's gradient: at once,
  # or a quarter of it on each of the cycle's steps.
  for t, after in enumerate(history):
    moved = (t + 1) / period if drift else 1.0
    np.testing.assert_allclose(
        after["layer0"]["w"],
        params["layer0"]["w"] - moved * 0.1 * grads[0]["layer0"]["w"],
        rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("drift, slow_scale", [(False, 2.0), (True, 0.5)])
def test_warns_when_the_slow_part_moves_more_than_one_update_per_cycle(
    drift, slow_scale):
  with pytest.warns(UserWarning, match=r"moves the slow parameters by 2 "
                    r"updates of the slow optimizer per cycle of 4 steps"):
    mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=4, drift=drift,
                 slow_scale=slow_scale)


def test_slow_scale_is_configurable():
  params, _, grads = reference_and_grads(4, False, steps=1)
  tx = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=4, drift=False,
                    slow_scale=0.5)
  (after,), _ = run_optimizer(tx, params, grads)
  np.testing.assert_array_equal(
      after["layer0"]["w"],
      params["layer0"]["w"] - np.float32(0.05) * grads[0]["layer0"]["w"])


def test_schedules_fast_sees_global_step_slow_sees_slow_updates():
  period, steps = 3, 9
  params = {"slow": jnp.zeros(()), "fast": jnp.zeros(())}
  grads = {"slow": jnp.ones(()), "fast": jnp.ones(())}
  lr = lambda count: (count + 1).astype(jnp.float32)  # step t has rate t + 1
  labels = {"slow": "slow", "fast": "fast"}
  one_optimizer = mo.multirate(optax.sgd(lr), labels=labels, period=period,
                               drift=False)
  in_slow_updates = mo.multirate(optax.sgd(lr), labels=labels, period=period,
                                 drift=False, slow_schedule_steps="slow")
  given_slow = mo.multirate(optax.sgd(lr), optax.sgd(lr), labels=labels,
                            period=period, drift=False)
  mapped = mo.multirate(
      optax.sgd(lr), optax.sgd(mo.in_slow_steps(lr, period)), labels=labels,
      period=period, drift=False)
  final = {name: run_optimizer(tx, params, [grads] * steps)[0][-1]
           for name, tx in [("one", one_optimizer), ("slow", in_slow_updates),
                            ("given", given_slow), ("mapped", mapped)]}
  # Fast: rates 1, 2, ..., 9 at steps 0..8.
  assert float(final["one"]["fast"]) == -sum(range(1, steps + 1))
  # One optimizer: the slow updates at t = 0, 3, 6 have rates 1, 4, 7 ...
  assert float(final["one"]["slow"]) == -(1 + 4 + 7)
  assert float(final["mapped"]["slow"]) == -(1 + 4 + 7)
  # ... and counted in slow updates (0, 1, 2), rates 1, 2, 3.
  assert float(final["slow"]["slow"]) == -(1 + 2 + 3)
  assert float(final["given"]["slow"]) == -(1 + 2 + 3)


def warmup_cosine_reference(grads_per_step, schedule, *, period, drift,
                            momentum):
  """One SGD-with-momentum optimizer for both groups, its rate in train steps.

  fast, every step t:   p_F = mu p_F + g_F;  th_F -= lr(t) p_F
  slow, t % k == 0:     p_S = mu p_S + g_S;  u = lr(t) p_S
                        th_S -= u (no drift), or th_S -= u / k on each step
                        of the cycle (drift)
  """
  theta = {"fast": np.zeros(4, np.float32), "slow": np.zeros(4, np.float32)}
  mom = {name: np.zeros(4, np.float32) for name in theta}
  held = np.zeros(4, np.float32)
  mu = np.float32(momentum)
  history = []
  for t, grads in enumerate(grads_per_step):
    lr = np.float32(schedule(t))
    mom["fast"] = mu * mom["fast"] + np.asarray(grads["fast"])
    theta["fast"] = theta["fast"] - lr * mom["fast"]
    if t % period == 0:
      mom["slow"] = mu * mom["slow"] + np.asarray(grads["slow"])
      held = lr * mom["slow"]
      if not drift:
        theta["slow"] = theta["slow"] - held
    if drift:
      theta["slow"] = theta["slow"] - held / np.float32(period)
    history.append({k: v.copy() for k, v in theta.items()})
  return history


@pytest.mark.parametrize("drift", [True, False])
def test_one_optimizer_schedule_follows_global_step(drift):
  period, steps = 4, 20
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 0.5, warmup_steps=5, decay_steps=steps, end_value=0.0)
  rng = np.random.default_rng(0)
  grads = [{name: jnp.asarray(rng.normal(size=4), jnp.float32)
            for name in ("fast", "slow")} for _ in range(steps)]
  params = {"fast": jnp.zeros(4), "slow": jnp.zeros(4)}
  tx = mo.multirate(optax.sgd(schedule, momentum=0.9),
                    labels={"fast": "fast", "slow": "slow"}, period=period,
                    drift=drift)
  history, _ = run_optimizer(tx, params, grads)
  expected = warmup_cosine_reference(grads, schedule, period=period,
                                     drift=drift, momentum=0.9)
  for got, want in zip(history, expected):
    for name in ("fast", "slow"):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_global_schedule_keeps_bias_correction_in_slow_updates():
  period, steps = 3, 7
  params = {"fast": jnp.zeros(2), "slow": jnp.zeros(2)}
  tx = mo.multirate(optax.adam(optax.linear_schedule(1.0, 0.0, 100)),
                    labels={"fast": "fast", "slow": "slow"}, period=period)
  grads = [jax.tree.map(jnp.ones_like, params)] * steps
  _, state = run_optimizer(tx, params, grads)
  adam, schedule = state.inner.inner_states["slow"].inner_state.inner
  assert int(adam.count) == 3  # slow updates at t = 0, 3, 6
  assert int(schedule.count) == 7  # evaluated at t = 6, then advanced


def test_slow_schedule_steps_is_checked():
  with pytest.raises(ValueError, match="slow_schedule_steps must be"):
    mo.multirate(optax.sgd(0.1), labels={"a": "fast"}, period=2,
                 slow_schedule_steps="fast")


def test_composes_with_inject_hyperparams():
  params, _, grads = reference_and_grads(2, False, steps=4)
  fast = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx = mo.multirate(fast, optax.sgd(0.1), labels=HEAD_FAST, period=2)
  state = tx.init(params)
  fast_state = state.inner.inner_states["fast"].inner_state
  fast_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  updates, _ = jax.jit(tx.update)(grads[0], state, params)
  np.testing.assert_array_equal(updates["head"]["w"], 0.0)
  assert np.all(np.asarray(updates["layer0"]["w"]) != 0.0)
  # And the whole multirate transformation under inject_hyperparams.
  outer = optax.inject_hyperparams(mo.multirate, static_args=("period", "drift"))(
      optax.sgd(0.1), labels=HEAD_FAST, period=2, slow_scale=2.0)
  outer_state = outer.init(params)
  outer_state.hyperparams["slow_scale"] = jnp.asarray(0.0)
  updates, _ = jax.jit(outer.update)(grads[0], outer_state, params)
  np.testing.assert_array_equal(updates["layer0"]["w"], 0.0)


def test_inject_hyperparams_with_static_structure_is_multirate_bitwise():
  params, _, grads = reference_and_grads(3, True, steps=6)
  labels = mo.fast_by_path("^head/")
  plain = mo.multirate(optax.sgd(0.1, momentum=0.9), labels=labels, period=3,
                       drift=True)
  injected = optax.inject_hyperparams(
      mo.multirate, static_args=("labels", "period", "drift"))(
          optax.sgd(0.1, momentum=0.9), labels=labels, period=np.int64(3),
          drift=True)
  want, _ = run_optimizer(plain, params, grads)
  got, _ = run_optimizer(injected, params, grads)
  chex.assert_trees_all_equal(got, want)


def test_period_may_be_a_numpy_integer():
  tx = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=np.int32(4))
  timetable = mo.find_timetable_state(tx.init(mlp_params())).timetable
  assert timetable == mo.MultirateTimetable(4)
  assert type(timetable.period) is int


def test_depth_labels_survive_sorted_keys():
  # Parameters returned by jit have sorted keys (Dense_10 before Dense_2):
  # the optimizer must keep the module order it saw at init.
  params = {f"Dense_{i}": {"kernel": jnp.full(2, float(i))} for i in range(11)}
  tx = mo.multirate(optax.sgd(1.0), labels=mo.fast_by_depth(1), period=2,
                    drift=False)
  state = tx.init(params)
  sorted_params = jax.jit(lambda p: p)(params)
  assert list(sorted_params)[:3] == ["Dense_0", "Dense_1", "Dense_10"]
  grads = jax.tree.map(jnp.ones_like, sorted_params)
  _, state = tx.update(grads, state, sorted_params)  # slow step: all move
  updates, _ = tx.update(grads, state, sorted_params)  # fast step
  assert float(updates["Dense_10"]["kernel"][0]) == -1.0
  assert float(updates["Dense_9"]["kernel"][0]) == 0.0


def test_composes_with_apply_if_finite():
  params, _, grads = reference_and_grads(2, False, steps=3)
  tx = optax.apply_if_finite(
      mo.multirate(optax.sgd(0.1, momentum=0.9), labels=HEAD_FAST, period=2),
      max_consecutive_errors=5)
  state = tx.init(params)
  update = jax.jit(tx.update)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[0])
  updates, bad_state = update(bad, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  assert int(bad_state.inner_state.count) == 0  # the schedule did not advance
  _, good_state = update(grads[0], bad_state, params)
  assert int(good_state.inner_state.count) == 1


def test_composes_in_chain_with_clipping():
  params, _, grads = reference_and_grads(2, False, steps=1)
  tx = optax.chain(optax.clip_by_global_norm(1e-3),
                   mo.multirate(optax.sgd(1.0), labels=HEAD_FAST, period=2,
                                drift=False))
  (after,), _ = run_optimizer(tx, params, grads)
  delta = jax.tree.map(lambda a, b: np.asarray(a - b), after, params)
  norm = np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in jax.tree.leaves(delta)))
  np.testing.assert_allclose(norm, 1e-3, rtol=1e-4)


def test_extra_args_reach_the_inner_optimizers():
  def scale_by_extra_arg():
    def update_fn(updates, state, params=None, *, factor, **extra_args):
      del params, extra_args
      return jax.tree.map(lambda u: u * factor, updates), state
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(), update_fn)

  params, _, grads = reference_and_grads(1, False, steps=1)
  tx = mo.multirate(scale_by_extra_arg(), labels=HEAD_FAST, period=2,
                    drift=False)
  updates, _ = jax.jit(tx.update)(grads[0], tx.init(params), params,
                                  factor=jnp.asarray(3.0))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: 3 * g, grads[0]))


class TestBadInput:

  @pytest.mark.parametrize("period, error", [
      (0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError),
      ("5", TypeError)])
  def test_period(self, period, error):
    with pytest.raises(error, match="period must be an int >= 1"):
      mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=period)

  def test_labels_structure(self):
    tx = mo.multirate(optax.sgd(0.1), labels={"layer0": "slow", "head": "fast"},
                      period=2)
    with pytest.raises(ValueError, match=r"parameters without a label: \['layer1/b'"):
      tx.init(mlp_params())

  def test_labels_extra_path(self):
    labels = dict(HEAD_FAST, layer9="slow")
    tx = mo.multirate(optax.sgd(0.1), labels=labels, period=2)
    with pytest.raises(ValueError, match=r"labels for paths the parameters do not have: \['layer9'\]"):
      tx.init(mlp_params())

  def test_unknown_group(self):
    labels = dict(HEAD_FAST, layer1={"w": "slow", "b": "fsat"})
    tx = mo.multirate(optax.sgd(0.1), labels=labels, period=2)
    with pytest.raises(ValueError, match=r"'layer1/b' is labelled 'fsat'.*\['fast', 'slow'\]"):
      tx.init(mlp_params())

  @pytest.mark.parametrize("pattern, empty", [("nothing", "fast"), ("", "slow")])
  def test_empty_group(self, pattern, empty):
    tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path(pattern), period=2)
    with pytest.raises(ValueError, match=f"no parameter is labelled '{empty}'"):
      tx.init(mlp_params())

  def test_state_made_for_another_period(self):
    params, _, grads = reference_and_grads(3, False, steps=1)
    state = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=3).init(params)
    other = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=5)
    message = (r"state was made for MultirateTimetable\(period=3\), but this "
               r"optimizer follows MultirateTimetable\(period=5\)")
    with pytest.raises(ValueError, match=message):
      other.update(grads[0], state, params)
    # The same through a train step built on the other optimizer.
    with pytest.raises(ValueError, match=message):
      mo.train_step(mlp_loss, other, dispatch="host")(params, state, batches(1)[0])

  def test_state_made_with_other_labels(self):
    params, _, grads = reference_and_grads(3, False, steps=1)
    state = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=3).init(params)
    other = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path("^(head|layer1)/"),
                         period=3)
    with pytest.raises(ValueError, match=r"other labels.*2 of 6 leaves differ: "
                       r"'layer1/b': state 'slow', this optimizer 'fast'"):
      other.update(grads[0], state, params)

  def test_slow_scale_not_a_number(self):
    with pytest.raises(TypeError, match=r"slow_scale must be a real number \(or a real scalar array\), got "
                       "'2' of type str"):
      mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=2, slow_scale="2")

  def test_inject_hyperparams_without_static_args(self):
    tx = optax.inject_hyperparams(mo.multirate)(
        optax.sgd(0.1), labels=HEAD_FAST, period=3)
    with pytest.raises(TypeError, match=r"period must be a Python or numpy int"
                       r".*inject_hyperparams.*static_args"):
      tx.init(mlp_params())

  def test_inject_hyperparams_with_callable_labels_not_static(self):
    tx = optax.inject_hyperparams(mo.multirate, static_args=("period",))(
        optax.sgd(0.1), labels=mo.fast_by_path("^head/"), period=3)
    with pytest.raises(TypeError, match=r"called with an integer scalar array"
                       r".*static_args=\('labels', 'period'"):
      tx.init(mlp_params())

  def test_update_with_other_structure(self):
    tx = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=2)
    state = tx.init(mlp_params())
    with pytest.raises(ValueError, match="tree has 2 leaves but the optimizer state"):
      tx.update({"a": jnp.ones(1), "b": jnp.ones(1)}, state)


def test_labels_by_path_and_depth():
  params = mlp_params()
  by_regex = mo.fast_by_path(r"^head/")(params)
  by_predicate = mo.fast_by_path(lambda path: path.endswith("/b"))(params)
  by_depth = mo.fast_by_depth(2)(params)
  assert by_regex == {"layer0": {"w": "slow", "b": "slow"},
                      "layer1": {"w": "slow", "b": "slow"},
                      "head": {"w": "fast", "b": "fast"}}
  assert [by_predicate[k]["b"] for k in params] == ["fast"] * 3
  assert [by_predicate[k]["w"] for k in params] == ["slow"] * 3
  assert [by_depth[k]["w"] for k in params] == ["slow", "fast", "fast"]


def test_depth_follows_module_order_not_sorted_order():
  params = {f"Dense_{i}": {"kernel": jnp.ones(1)} for i in range(11)}
  labels = mo.fast_by_depth(1)(params)
  assert labels["Dense_10"]["kernel"] == "fast"
  assert labels["Dense_9"]["kernel"] == "slow"
  with pytest.raises(ValueError, match="more fast modules than the 11"):
    mo.fast_by_depth(12)(params)
  with pytest.raises(ValueError, match="int >= 1, got 0"):
    mo.fast_by_depth(0)
