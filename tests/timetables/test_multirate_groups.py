"""Multirate with any number of groups against a hand-written loop; programs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from multirate_optax import checkpoint
from _models import HEAD_FAST, batches, mlp_loss, mlp_params
from _probes import count_compilations, count_host_reads, hlo_op_count

GROUPS = {"layer0": "backbone", "layer1": "top", "head": "head"}
PERIODS = {"head": 1, "top": 2, "backbone": 6}
STEPS = 14  # Two cycles of 6 and two steps of a third.
LR, MU = 0.1, 0.9
ADAM_LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8
# XLA:CPU fuses multiply-adds a numpy loop does not, so agreement with the
# reference loop is to float32 rounding: SGD-momentum within rtol 1e-5 /
# atol 1e-6 (as multirate's tests), Adam (a division by a square root of
# small moments) within rtol 2e-5 / atol 2e-6: Adam divides gradient entries
# near zero by their own size, so the ulps by which the step's gradient and
# the loop's differ show up times its rate (hence a rate of 1e-2 here).
# Everything said to be untouched is compared bitwise.
TOLERANCE = {"sgd": dict(rtol=1e-5, atol=1e-6),
             "adam": dict(rtol=2e-5, atol=2e-6)}


def reference(params, data, *, periods, drift, kinds, lr=None):
  """Multirate with N groups, in numpy, from the algorithm.

  Group g with period p takes one step of its optimizer on the steps t with
  t % p == 0, from that step's gradient; its optimizer state (momentum,
  Adam's moments and count n) changes on those steps only. Without drift the
  step is applied at once; with drift (p > 1) a p-th of it is applied on
  each of the p steps from t on. ``kinds[g]`` is 'sgd' (momentum MU) or
  'adam'; ``lr(g, t, n)`` the rate of its n-th update (from 0) at step t
  (default LR for SGD, ADAM_LR for Adam).
  """
  if lr is None:
    lr = lambda g, t, n: LR if kinds[g] == "sgd" else ADAM_LR
  grad_fn = jax.jit(jax.grad(mlp_loss))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [mo.path_str(p) for p, _ in flat]
  group = {p: GROUPS[p.split("/")[0]] for p in paths}
  theta = {p: np.asarray(v, np.float32).copy() for p, (_, v) in zip(paths, flat)}
  m = {p: np.zeros_like(v) for p, v in theta.items()}
  v = {p: np.zeros_like(x) for p, x in theta.items()}
  held = {p: np.zeros_like(x) for p, x in theta.items()}
  updates_so_far = {g: 0 for g in periods}
  history = []
  for t, batch in enumerate(data):
    current = jax.tree.unflatten(treedef, [theta[p] for p in paths])
    grads = dict(zip(paths, map(np.asarray, jax.tree.leaves(
        grad_fn(current, batch)))))
    for p in paths:
      g = group[p]
      period = periods[g]
      drifts = (drift[g] if isinstance(drift, dict) else drift) and period > 1
      if t % period == 0:
        n = updates_so_far[g]
        rate = np.float32(lr(g, t, n))
        if kinds[g] == "sgd":
          m[p] = np.float32(MU) * m[p] + grads[p]
          u = -rate * m[p]
        else:
          m[p] = np.float32(B1) * m[p] + np.float32(1 - B1) * grads[p]
          v[p] = np.float32(B2) * v[p] + np.float32(1 - B2) * grads[p] ** 2
          m_hat = m[p] / np.float32(1 - B1 ** (n + 1))
          v_hat = v[p] / np.float32(1 - B2 ** (n + 1))
          u = -rate * m_hat / (np.sqrt(v_hat) + np.float32(EPS))
        if drifts:
          held[p] = u * np.float32(1 / period)
        else:
          theta[p] = theta[p] + u
      if drifts:
        theta[p] = theta[p] + held[p]
    for g, period in periods.items():
      updates_so_far[g] += t % period == 0
    history.append(jax.tree.unflatten(treedef, [theta[p].copy() for p in paths]))
  return history


def make(kind):
  return (optax.sgd(LR, momentum=MU) if kind == "sgd"
          else optax.adam(ADAM_LR, b1=B1, b2=B2, eps=EPS))


def train(step, params, opt_state, data):
  history, states = [], []
  for batch in data:
    params, opt_state, _ = step(params, opt_state, batch)
    history.append(jax.tree.map(np.array, params))
    states.append(jax.tree.map(np.array, opt_state))
  return history, states


def run_plain(tx, params, data):
  """``tx.update`` under jit with the gradient of every parameter."""

  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(mlp_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  state, history = tx.init(params), []
  for batch in data:
    params, state = step(params, state, batch)
    history.append(params)
  return history


def group_state(state, g):
  inner = state.inner.inner_states[g].inner_state
  return inner.inner if isinstance(inner, mo.GateState) else inner


class TestTimetable:

  def test_phases_are_the_distinct_sets_of_active_groups(self):
    tt = mo.MultirateGroupsTimetable(PERIODS)
    assert tt.periods == (("head", 1), ("top", 2), ("backbone", 6))
    assert tt.cycle == 6
    assert tt.phases == (frozenset(PERIODS), frozenset({"head"}),
                         frozenset({"head", "top"}))
    expected = [0, 1, 2, 1, 2, 1] * 3
    assert [tt.phase(t) for t in range(18)] == expected
    assert [tt.phase(np.int64(t)) for t in range(18)] == expected
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(tt.phase))(jnp.arange(18, dtype=jnp.int32)), expected)

  def test_periods_that_do_not_divide_one_another(self):
    tt = mo.MultirateGroupsTimetable({"a": 1, "b": 4, "c": 6})
    assert tt.cycle == 12
    assert tt.phases == (frozenset("abc"), frozenset("a"), frozenset("ab"),
                         frozenset("ac"))
    # The phase of step t from its definition: which periods divide t.
    want = [tt.phases.index(frozenset(g for g, p in tt.periods if t % p == 0))
            for t in range(30)]
    assert [tt.phase(t) for t in range(30)] == want
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(tt.phase))(jnp.arange(30, dtype=jnp.int32)), want)

  def test_order_of_the_periods_does_not_matter(self):
    a = mo.MultirateGroupsTimetable({"backbone": 6, "top": 2, "head": 1})
    b = mo.MultirateGroupsTimetable((("head", 1), ("backbone", 6), ("top", 2)))
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    assert a != mo.MultirateGroupsTimetable({"head": 1, "top": 2, "backbone": 8})

  def test_groups_sharing_a_period_share_its_phases(self):
    tt = mo.MultirateGroupsTimetable({"a": 1, "b": 3, "c": 3})
    assert tt.phases == (frozenset("abc"), frozenset("a"))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("drift", [False, True])
def test_follows_the_reference_loop_with_host_and_cond(kind, drift):
  data = batches(STEPS)
  params = mlp_params()
  expected = reference(params, data, periods=PERIODS, drift=drift,
                       kinds=dict.fromkeys(PERIODS, kind))
  tx = mo.multirate_groups(make(kind), labels=GROUPS, periods=PERIODS,
                           drift=drift)
  results = {}
  for dispatch in ("host", "cond"):
    step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
    results[dispatch] = train(step, params, tx.init(params), data)
    chex.assert_trees_all_close(results[dispatch][0], expected,
                                **TOLERANCE[kind])
  # The same per-phase computation either way.
  chex.assert_trees_all_equal(results["cond"], results["host"])
  # As a plain optax transformation, given every gradient, outside a train
  # step: its groups' activity then follows the count.
  chex.assert_trees_all_close(run_plain(tx, params, data), expected,
                              **TOLERANCE[kind])

  history, states = results["host"]
  before = [jax.tree.map(np.asarray, params)] + history[:-1]
  state_before = [jax.tree.map(np.asarray, tx.init(params))] + states[:-1]
  for t in range(STEPS):
    for name, g in GROUPS.items():
      on = t % PERIODS[g] == 0
      moved = not np.array_equal(history[t][name]["w"], before[t][name]["w"])
      assert moved == (on or (drift and PERIODS[g] > 1)), (t, g)
      if not on:  # Its optimizer state is bitwise untouched off its steps.
        chex.assert_trees_all_equal(group_state(states[t], g),
                                    group_state(state_before[t], g))


def test_each_group_its_optimizer_drift_and_schedule():
  # Head: SGD-momentum on the global step; top: Adam with drift; backbone:
  # SGD-momentum without drift, its schedule in its own updates.
  schedule = lambda n: LR / (1.0 + 0.5 * n)
  optimizers = {"head": optax.sgd(LR, momentum=MU), "top": make("adam"),
                "backbone": optax.sgd(schedule, momentum=MU)}
  data = batches(STEPS)
  params = mlp_params()
  expected = reference(
      params, data, periods=PERIODS,
      drift={"head": True, "top": True, "backbone": False},
      kinds={"head": "sgd", "top": "adam", "backbone": "sgd"},
      lr=lambda g, t, n: {"head": LR, "top": ADAM_LR}.get(g) or schedule(n))
  tx = mo.multirate_groups(optimizers, labels=GROUPS, periods=PERIODS,
                           drift={"backbone": False})
  history, _ = train(mo.train_step(mlp_loss, tx), params, tx.init(params),
                     data)
  chex.assert_trees_all_close(history, expected, **TOLERANCE["adam"])


@pytest.mark.parametrize("schedule_steps", [None, "global", "group"])
def test_a_shared_optimizers_schedules_see_the_global_step(schedule_steps):
  schedule = lambda t: LR / (1.0 + 0.25 * t)
  seen = "global" if schedule_steps in (None, "global") else "group"
  data = batches(STEPS)
  params = mlp_params()
  expected = reference(
      params, data, periods=PERIODS, drift=True,
      kinds=dict.fromkeys(PERIODS, "sgd"),
      lr=lambda g, t, n: schedule(t if seen == "global" else n))
  tx = mo.multirate_groups(optax.sgd(schedule, momentum=MU), labels=GROUPS,
                           periods=PERIODS, schedule_steps=schedule_steps)
  history, _ = train(mo.train_step(mlp_loss, tx), params, tx.init(params),
                     data)
  chex.assert_trees_all_close(history, expected, **TOLERANCE["sgd"])


@pytest.mark.parametrize("dispatch", ["host", "cond"])
@pytest.mark.parametrize("shared, drift, period", [
    (True, True, 3), (False, False, 3), (False, True, 2), (True, False, 5)])
def test_two_groups_are_multirate_bitwise(shared, drift, period, dispatch):
  fast, slow = optax.sgd(0.05, momentum=MU), make("adam")
  if shared:
    fast = optax.sgd(optax.linear_schedule(0.1, 0.01, 10), momentum=MU)
  two = mo.multirate(fast, None if shared else slow, labels=HEAD_FAST,
                     period=period, drift=drift)
  many = mo.multirate_groups(
      fast if shared else {"fast": fast, "slow": slow}, labels=HEAD_FAST,
      periods={"fast": 1, "slow": period}, drift=drift)
  data = batches(2 * period + 1)
  params = mlp_params()
  got = train(mo.train_step(mlp_loss, many, dispatch=dispatch), params,
              many.init(params), data)
  want = train(mo.train_step(mlp_loss, two, dispatch=dispatch), params,
               two.init(params), data)
  chex.assert_trees_all_equal(got[0], want[0])
  # The same optimizer states too, but for the timetable they name.
  inner = lambda states: [s.inner for s in states]
  chex.assert_trees_all_equal(inner(got[1]), inner(want[1]))


def test_each_phase_differentiates_its_active_groups_only():
  # Periods 1, 4, 6: the phase {head, backbone} backpropagates through the
  # top layer (layer1) without its weight gradient.
  periods = {"head": 1, "top": 4, "backbone": 6}
  tx = mo.multirate_groups(optax.sgd(0.1), labels=GROUPS, periods=periods)
  params = mlp_params()
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  args = (params, tx.init(params), batches(1)[0])
  timetable = mo.find_timetable_state(args[1]).timetable
  assert [sorted(p) for p in timetable.phases] == [
      ["backbone", "head", "top"], ["head"], ["head", "top"],
      ["backbone", "head"]]
  dots = [hlo_op_count(step.program(*args, phase=p), "dot") for p in range(4)]
  # Forward 3 dots; a weight gradient per active layer; input gradients from
  # the head down to the lowest active layer.
  assert dots == [3 + 3 + 2, 3 + 1, 3 + 2 + 1, 3 + 2 + 2]
  # Each phase's gates are Python booleans: no conditional in a phase's
  # program, one (the lax.switch) in 'cond''s.
  for p in range(4):
    assert "conditional(" not in step.program(*args, phase=p).compile().as_text()
  cond = mo.train_step(mlp_loss, tx, dispatch="cond")
  assert cond.program(*args).compile().as_text().count("conditional(") == 1


@pytest.mark.parametrize("dispatch, met", [
    ("host", [1, 2, 3, 3, 3, 3, 3, 3, 3]), ("cond", [1] * 9)])
def test_one_program_per_phase_and_none_per_step(dispatch, met):
  tx = mo.multirate_groups(optax.sgd(0.1, momentum=MU), labels=GROUPS,
                           periods=PERIODS)
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  data = batches(14)
  counts = []
  with count_compilations() as compiled:
    for batch in data[:9]:
      params, opt_state, _ = step(params, opt_state, batch)
      counts.append(compiled[0])
    with count_host_reads() as reads:
      for batch in data[9:]:
        params, opt_state, loss = step(params, opt_state, batch)
  assert counts == met
  assert compiled[0] == met[-1]
  assert reads[0] == 0
  assert np.isfinite(float(loss))


def test_composes_in_chain_with_clipping():
  # Clipping sees the gradients the step computes: zero for inactive groups.
  data = batches(8)
  params = mlp_params()
  tx = optax.chain(optax.clip_by_global_norm(0.5), mo.multirate_groups(
      optax.sgd(LR), labels=GROUPS, periods=PERIODS, drift=False))
  history, _ = train(mo.train_step(mlp_loss, tx), params, tx.init(params),
                     data)
  grad_fn = jax.jit(jax.grad(mlp_loss))
  want = jax.tree.map(np.asarray, params)
  for t, batch in enumerate(data):
    grads = jax.tree.map(np.asarray, grad_fn(want, batch))
    used = [n for n, g in GROUPS.items() if t % PERIODS[g] == 0]
    norm = np.sqrt(sum(np.sum(x ** 2) for n in used
                       for x in grads[n].values()))
    factor = np.float32(min(1.0, 0.5 / norm))
    for n in used:
      for leaf in want[n]:
        want[n][leaf] = want[n][leaf] - np.float32(LR) * factor * grads[n][leaf]
    chex.assert_trees_all_close(history[t], want, **TOLERANCE["sgd"])


class TestCheckpoint:

  def make(self, periods=PERIODS):
    return mo.multirate_groups(
        {"head": optax.adam(1e-2), "top": optax.sgd(0.05, momentum=MU),
         "backbone": optax.sgd(0.1, momentum=MU)},
        labels=GROUPS, periods=periods)

  @pytest.mark.parametrize("dispatch", ["host", "cond"])
  def test_resumes_bitwise_mid_cycle(self, tmp_path, dispatch):
    data, save_at = batches(13), 5  # 5 % 6, 5 % 2: mid-cycle for both.
    tx = self.make()
    params = mlp_params()
    step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
    state = {"params": params, "opt_state": tx.init(params)}
    for batch in data[:save_at]:
      p, s, _ = step(state["params"], state["opt_state"], batch)
      state = {"params": p, "opt_state": s}
    checkpoint.save(tmp_path, save_at, state)
    want, _ = train(step, state["params"], state["opt_state"], data[save_at:])
    fresh = self.make()
    target = {"params": mlp_params(seed=3), "opt_state": fresh.init(params)}
    restored = checkpoint.restore(tmp_path, target)
    assert int(mo.find_timetable_state(restored["opt_state"]).count) == save_at
    got, _ = train(mo.train_step(mlp_loss, fresh, dispatch=dispatch),
                   restored["params"], restored["opt_state"], data[save_at:])
    chex.assert_trees_all_equal(got, want)

  def test_refuses_a_state_of_another_timetable(self, tmp_path):
    params = mlp_params()
    checkpoint.save(tmp_path, 0, {"params": params,
                                  "opt_state": self.make().init(params)})
    other = self.make({"head": 1, "top": 2, "backbone": 8})
    with pytest.raises(ValueError, match=(
        r"another timetable: expected MultirateGroupsTimetable\(periods=.*"
        r"\('backbone', 8\).*found MultirateGroupsTimetable\(periods=.*"
        r"\('backbone', 6\)")):
      checkpoint.restore(tmp_path, {"params": params,
                                    "opt_state": other.init(params)})
    two = mo.multirate(optax.sgd(0.1), labels=HEAD_FAST, period=6)
    with pytest.raises(ValueError, match=r"expected MultirateTimetable\("
                       r"period=6\).*found MultirateGroupsTimetable"):
      checkpoint.restore(tmp_path, {"params": params,
                                    "opt_state": two.init(params)})
    # And the optimizer itself refuses a state made for other periods.
    state = self.make().init(params)
    with pytest.raises(ValueError, match=r"made for MultirateGroupsTimetable"
                       r".*but this optimizer follows MultirateGroupsTimetable"):
      other.update(jax.tree.map(jnp.ones_like, params), state, params)


class TestBadInput:

  @pytest.mark.parametrize("periods, error, match", [
      ({"head": 1, "top": 0}, ValueError,
       "the period of group 'top' must be an int >= 1, got 0"),
      ({"head": 1, "top": -2}, ValueError, "group 'top' must be an int >= 1"),
      ({"head": 1, "top": 2.0}, TypeError,
       "period of group 'top' must be an int >= 1, got 2.0 of type float"),
      ({"head": True}, TypeError, "group 'head' must be an int"),
      ({"head": "5"}, TypeError, "group 'head' must be an int"),
      ({}, TypeError, "periods must be a non-empty mapping"),
      ((("head", 1), ("head", 2)), ValueError,
       r"names groups \['head'\] more than once"),
      ({1: 2}, TypeError, "group names must be str, got 1"),
      ({"a": 1009, "b": 1013}, ValueError,
       r"repeat only every 1022117 steps.*more than the 1000000"),
      ({f"g{p}": p for p in (1, 2, 3, 5, 7, 11, 13, 17)}, ValueError,
       r"give 128 distinct sets of active groups \(phases\) over their cycle "
       r"of 510510 steps, more than 64"),
  ])
  def test_periods(self, periods, error, match):
    with pytest.raises(error, match=match):
      mo.multirate_groups(optax.sgd(0.1), labels=GROUPS, periods=periods)

  def test_a_group_without_parameters(self):
    tx = mo.multirate_groups(optax.sgd(0.1), labels=GROUPS,
                             periods={**PERIODS, "embed": 3})
    with pytest.raises(ValueError, match=r"groups \['embed'\] of periods have "
                       r"no parameters.*'layer0/b'"):
      tx.init(mlp_params())

  def test_a_label_naming_an_unknown_group(self):
    tx = mo.multirate_groups(optax.sgd(0.1), periods=PERIODS,
                             labels=dict(GROUPS, layer1="middle"))
    with pytest.raises(ValueError, match=r"'layer1/b' is labelled 'middle', "
                       r"which is not a group; expected one of \['backbone', "
                       r"'head', 'top'\]"):
      tx.init(mlp_params())

  def test_labels_by_path(self):
    labels = mo.groups_by_path({"head": "^head/", "top": "^layer1/"},
                               default="backbone")
    tx = mo.multirate_groups(optax.sgd(0.1), labels=labels, periods=PERIODS)
    assert mo.find_timetable_state(tx.init(mlp_params())).labels == (
        "head", "head", "backbone", "backbone", "top", "top")

  @pytest.mark.parametrize("kwargs, error, match", [
      (dict(optimizers={"head": optax.sgd(0.1)}), ValueError,
       r"optimizers has no entry for groups \['top', 'backbone'\]"),
      (dict(optimizers={**dict.fromkeys(PERIODS, optax.sgd(0.1)),
                        "stem": optax.sgd(0.1)}), ValueError,
       r"optimizers names groups \['stem'\] that periods does not have"),
      (dict(optimizers=[optax.sgd(0.1)]), TypeError,
       "optimizers must be an optax.GradientTransformation"),
      (dict(drift={"tpo": False}), ValueError,
       r"drift names groups \['tpo'\]"),
      (dict(drift="yes"), TypeError, "drift must be a bool or a mapping"),
      (dict(scales={"top": "2"}), TypeError,
       "the scale of group 'top' must be a real number"),
      (dict(scales={"neck": 1.0}), ValueError, r"scales names groups \['neck'\]"),
      (dict(schedule_steps="slow"), ValueError,
       "schedule_steps must be 'global', 'group' or None"),
  ])
  def test_arguments(self, kwargs, error, match):
    kwargs = {"optimizers": optax.sgd(0.1), **kwargs}
    with pytest.raises(error, match=match):
      mo.multirate_groups(labels=GROUPS, periods=PERIODS, **kwargs)

  def test_warns_when_a_group_moves_more_than_one_update_per_period(self):
    with pytest.warns(UserWarning, match=r"scale 0.75 of group 'backbone' "
                      r"moves it by 4.5 updates of its optimizer per period "
                      r"of 6 steps"):
      mo.multirate_groups(optax.sgd(0.1), labels=GROUPS, periods=PERIODS,
                          scales={"backbone": 0.75})


@pytest.mark.parametrize("dispatch", ["host", "cond"])
def test_every_flavour_of_train_step_computes_the_same_bits(dispatch):
  # The core, Linen, NNX and Equinox steps on the same MLP (tests/_steps.py),
  # three groups labelled by path in each flavour's own tree.
  from _steps import FLAVOURS, HARNESSES, train as train_flavour
  tx = mo.multirate_groups(
      optax.sgd(LR, momentum=MU), periods=PERIODS,
      labels=mo.groups_by_path({"head": "head", "top": "layer1"},
                               default="backbone"))
  data = batches(8)
  results = [train_flavour(HARNESSES[f](1, dispatch=dispatch,
                                        wrap=lambda _: tx), data)
             for f in FLAVOURS]
  for result in results[1:]:
    chex.assert_trees_all_equal(result, results[0])
  expected = reference(mlp_params(), data, periods=PERIODS, drift=True,
                       kinds=dict.fromkeys(PERIODS, "sgd"))
  chex.assert_trees_all_close(results[0], expected, **TOLERANCE["sgd"])
