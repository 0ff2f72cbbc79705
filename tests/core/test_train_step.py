"""The core train step beyond the shared battery (tests/test_steps.py).

Plain optax training at period 1, chains with clipping, aux and mutable state,
``lax.scan``, low precision, the choice of dispatch, and optax's wrappers
under ``'host'`` dispatch.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import HEAD_FAST, batches, is_fast, mlp_loss, mlp_params
from _probes import input_output_aliases
from _reference import multirate_sgd

H, MU, STEPS = 0.2, 0.9, 22


def train(step, params, opt_state, data):
  history = []
  for batch in data:
    params, opt_state, _ = step(params, opt_state, batch)
    history.append(jax.tree.map(np.array, params))  # before it is donated
  return history, opt_state


def multirate_sgd_tx(period, drift=False):
  # Vlaar & Leimkuhler's h_F = h / k, h_S = h (per cycle).
  return mo.multirate(optax.sgd(H / period, momentum=MU),
                      optax.sgd(H, momentum=MU), labels=HEAD_FAST,
                      period=period, drift=drift)


@pytest.mark.parametrize("dispatch", ["cond", "host"])
@pytest.mark.parametrize("make_inner", [
    lambda: optax.sgd(0.05, momentum=0.9), lambda: optax.adam(1e-2)])
def test_period_one_is_plain_optax_training_bitwise(dispatch, make_inner):
  data = batches(10)
  tx = make_inner()

  @jax.jit
  def plain_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = mlp_params()
  want, _ = train(plain_step, params, tx.init(params), data)
  multi = mo.multirate(make_inner(), labels=HEAD_FAST, period=1)
  params = mlp_params()
  got, _ = train(mo.train_step(mlp_loss, multi, dispatch=dispatch), params,
                 multi.init(params), data)
  chex.assert_trees_all_equal(got, want)


def test_in_chain_with_clipping_follows_the_reference():
  # On fast steps only the fast gradients exist, so the clipping norm is
  # theirs; on slow steps it is the norm of all gradients.
  data = batches(STEPS)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=4, drift=False, is_fast=is_fast, clip_norm=0.5)
  tx = optax.chain(optax.clip_by_global_norm(0.5), multirate_sgd_tx(4))
  params = mlp_params()
  got, _ = train(mo.train_step(mlp_loss, tx), params, tx.init(params), data)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_aux_mutable_state_and_rng():
  """A loss with BatchNorm-like running statistics and a dropout rng."""

  def loss_fn(params, stats, batch, rng):
    x, y = batch
    keep = jax.random.bernoulli(rng, 0.9, x.shape)
    x = jnp.where(keep, x / 0.9, 0.0)
    new_stats = 0.9 * stats + 0.1 * jnp.mean(x, axis=0)
    loss = mlp_loss(params, (x - new_stats, y))
    return loss, {"stats": new_stats}

  for dispatch in ("cond", "host"):
    tx = multirate_sgd_tx(2)
    params = mlp_params()
    opt_state = tx.init(params)
    step = mo.train_step(loss_fn, tx, has_aux=True, dispatch=dispatch)
    stats = jnp.zeros(6)
    rng = jax.random.key(0)
    for t, batch in enumerate(batches(4)):
      params, opt_state, (loss, aux) = step(
          params, opt_state, stats, batch, jax.random.fold_in(rng, t))
      new_stats = aux["stats"]
      assert not np.array_equal(new_stats, stats)  # updated on fast steps too
      stats = new_stats
    assert np.isfinite(float(loss))


def test_scan_over_steps_with_apply():
  tx = multirate_sgd_tx(3)
  data = batches(9)
  params = mlp_params()
  want, _ = train(mo.train_step(mlp_loss, tx, dispatch="cond"), params,
                  tx.init(params), data)
  step = mo.train_step(mlp_loss, tx, dispatch="cond")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *data)

  @jax.jit
  def run(params, opt_state, stacked):
    def body(carry, batch):
      params, opt_state, _ = step.apply(*carry, batch)
      return (params, opt_state), None
    return jax.lax.scan(body, (params, opt_state), stacked)[0]

  params = mlp_params()
  got, _ = run(params, tx.init(params), stacked)
  chex.assert_trees_all_close(got, want[-1], rtol=1e-6, atol=1e-7)


def test_vmapped_ensemble_of_members_at_different_counts():
  """Each member of a vmapped ensemble trains as it would alone.

  The members are at steps 0, 1 and 2 of period 3 (a slow step and two fast
  ones) with their own parameters and minibatches; under vmap the count is
  batched, lax.switch becomes a select over both phases' results, and each
  member must get its own phase's.
  """
  tx = multirate_sgd_tx(3)
  step = mo.train_step(mlp_loss, tx, dispatch="cond")
  members, alone = [], []
  for member in range(3):
    params = mlp_params(seed=member)
    opt_state = tx.init(params)
    data = batches(member + 4, seed=10 + member)
    for batch in data[:member]:  # to its own count
      params, opt_state, _ = step(params, opt_state, batch)
    members.append((jax.tree.map(jnp.copy, (params, opt_state)),
                    data[member:]))
    alone.append(train(step, params, opt_state, data[member:])[0])
  stack = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  params, opt_state = stack(*(state for state, _ in members))
  data = [stack(*batch) for batch in zip(*(data for _, data in members))]
  assert [int(c) for c in mo.find_timetable_state(opt_state).count] == [0, 1, 2]
  ensemble, opt_state = train(jax.vmap(step), params, opt_state, data)
  for member, want in enumerate(alone):
    got = [jax.tree.map(lambda x: x[member], params) for params in ensemble]
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert [int(c) for c in mo.find_timetable_state(opt_state).count] == [4, 5, 6]


def test_host_dispatch_under_vmap_is_refused():
  tx = multirate_sgd_tx(3)
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  params = jax.tree.map(lambda x: jnp.stack([x, x]), mlp_params())
  opt_state = jax.vmap(tx.init)(params)
  batch = jax.tree.map(lambda x: jnp.stack([x, x]), batches(1)[0])
  with pytest.raises(TypeError, match=r"jax.vmap.*dispatch='cond'"):
    jax.vmap(step)(params, opt_state, batch)


@pytest.mark.parametrize("dispatch", ["cond", "host"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_parameters(dispatch, dtype):
  tx = mo.multirate(optax.sgd(0.05, momentum=0.9), labels=HEAD_FAST, period=2,
                    drift=True)
  params = mlp_params(dtype=dtype)
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch)
  losses = []
  for batch in batches(8, dtype=dtype) * 3:
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, mlp_params(dtype=dtype))
  assert losses[-1] < losses[0]


def test_auto_dispatch():
  assert mo.resolve_dispatch("auto", "cpu") == "host"
  assert mo.resolve_dispatch("auto", "gpu") == "cond"
  assert mo.resolve_dispatch("auto", "tpu") == "cond"
  assert mo.resolve_dispatch("cond", "cpu") == "cond"
  assert mo.train_step(mlp_loss, multirate_sgd_tx(2)).dispatch == (
      "host" if jax.default_backend() == "cpu" else "cond")
  with pytest.raises(ValueError, match="dispatch must be"):
    mo.train_step(mlp_loss, multirate_sgd_tx(2), dispatch="device")



@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_a_donated_state_is_updated_in_place_in_every_phase(dispatch):
  # Three groups with drift: the step that updates every group does not read
  # their held updates. Were those arguments dropped from its program, jit
  # would write the backbone's new held update into the buffer of the top
  # group's momentum (same shape), which XLA must then copy, and allocate
  # the outputs left without a buffer afresh. Every output must instead
  # reuse the buffer of the argument in its place, in every program.
  tx = mo.multirate_groups(
      optax.sgd(0.1, momentum=0.9),
      labels={"layer0": "backbone", "layer1": "top", "head": "head"},
      periods={"head": 1, "top": 2, "backbone": 6})
  params = mlp_params()
  opt_state = tx.init(params)
  step = mo.train_step(mlp_loss, tx, dispatch=dispatch, donate=True)
  args = (params, opt_state, batches(1)[0])
  donated = len(jax.tree.leaves((params, opt_state)))
  in_place = {i: i for i in range(donated)}
  phases = range(3) if dispatch == "host" else [None]
  for phase in phases:
    assert input_output_aliases(step.program(*args, phase=phase)) == in_place


# optax's wrappers that hold an inner state and advance it once per update:
# 'host' dispatch runs inside them, and runs the same phases as 'cond'.
ADVANCING_WRAPPERS = {
    "chain": lambda tx: optax.chain(optax.clip(10.0), tx),
    "named_chain": lambda tx: optax.named_chain(("clip", optax.clip(10.0)),
                                                ("multirate", tx)),
    "masked": lambda tx: optax.masked(tx, lambda p: jax.tree.map(lambda _: True, p)),
    "partition": lambda tx: optax.partition({"all": tx}, lambda p: jax.tree.map(
        lambda _: "all", p)),
    "inject_hyperparams": lambda tx: optax.inject_hyperparams(
        lambda learning_rate: optax.chain(tx, optax.scale(learning_rate)))(
            learning_rate=1.0),
    "schedule_free": lambda tx: optax.contrib.schedule_free(tx, learning_rate=0.1),
    "mechanize": lambda tx: optax.contrib.mechanize(tx),
}

# Wrappers that may leave the inner state unchanged on some updates.
SKIPPING_WRAPPERS = {
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, 3),
    "MultiSteps": lambda tx: optax.MultiSteps(tx, 2),
    "conditionally_mask": lambda tx: optax.conditionally_mask(
        tx, lambda count: count % 2 == 0),
    "conditionally_transform": lambda tx: optax.conditionally_transform(
        tx, lambda count: count % 2 == 0),
}


@pytest.mark.parametrize("name", list(ADVANCING_WRAPPERS))
def test_host_dispatch_inside_wrappers_that_advance_every_step(name):
  wrap = ADVANCING_WRAPPERS[name]
  data = batches(7)
  results = {}
  for dispatch in ("cond", "host"):
    tx = wrap(multirate_sgd_tx(3))
    params = mlp_params()
    # mechanize's state holds the initial parameters themselves, which
    # cannot be donated twice in one call.
    step = mo.train_step(mlp_loss, tx, dispatch=dispatch, donate=False)
    results[dispatch], _ = train(step, params, tx.init(params), data)
  chex.assert_trees_all_equal(results["host"], results["cond"])


@pytest.mark.parametrize("name", list(SKIPPING_WRAPPERS))
def test_host_dispatch_refuses_wrappers_that_may_skip_updates(name):
  tx = SKIPPING_WRAPPERS[name](multirate_sgd_tx(3))
  params = mlp_params()
  step = mo.train_step(mlp_loss, tx, dispatch="host")
  with pytest.raises(ValueError, match="not known to advance it once per step"):
    step(params, tx.init(params), batches(1)[0])
  # 'cond' takes the phase from the state itself, so it runs inside them.
  mo.train_step(mlp_loss, tx, dispatch="cond")(
      params, tx.init(params), batches(1)[0])


class TestBadInput:

  def setup_method(self):
    self.tx = multirate_sgd_tx(2)
    self.params = mlp_params()
    self.opt_state = self.tx.init(self.params)

  @pytest.mark.parametrize("dispatch", ["cond", "host"])
  def test_loss_signature(self, dispatch):
    def loss_fn(params):
      return jnp.sum(params["head"]["w"])
    step = mo.train_step(loss_fn, self.tx, dispatch=dispatch)
    with pytest.raises(TypeError, match=r"cannot be called as loss_fn\(params, \*args\) with 1"):
      step(self.params, self.opt_state, batches(1)[0])

  def test_loss_with_aux_but_no_has_aux(self):
    step = mo.train_step(lambda p, b: (mlp_loss(p, b), {}), self.tx)
    with pytest.raises(TypeError, match="pass has_aux=True"):
      step(self.params, self.opt_state, batches(1)[0])

  def test_loss_not_scalar(self):
    step = mo.train_step(lambda p, b: mlp_loss(p, b) * jnp.ones(3), self.tx)
    with pytest.raises(TypeError, match=r"scalar loss, got an array of shape \(3,\)"):
      step(self.params, self.opt_state, batches(1)[0])

  def test_optimizer_without_schedule(self):
    tx = optax.sgd(0.1)
    step = mo.train_step(mlp_loss, tx)
    with pytest.raises(ValueError, match="holds no timetable of active groups"):
      step(self.params, tx.init(self.params), batches(1)[0])

  def test_not_callable(self):
    with pytest.raises(TypeError, match="loss_fn must be callable"):
      mo.train_step(None, self.tx)

  @pytest.mark.parametrize("dispatch", ["cond", "host"])
  def test_parameters_that_are_not_floats(self, dispatch):
    # What a whole Equinox model brings: a function and an int among the
    # arrays. jax.jit refuses the first, jax.grad the second, naming neither.
    params = dict(self.params, activation=jnp.tanh,
                  steps=jnp.zeros((), jnp.int32))
    tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path("^head/"),
                      period=2)
    state = tx.init({k: v for k, v in params.items() if k != "activation"})
    step = mo.train_step(lambda p, b: mlp_loss(p, b), tx, dispatch=dispatch)
    with pytest.raises(TypeError, match=(
        r"2 of 8 leaves that are not floating-point arrays.*'activation' "
        r"\(a PjitFunction\), 'steps' \(an array of dtype int32\).*"
        r"multirate_optax.equinox.train_step.*eqx.partition")):
      step(params, state, batches(1)[0])
    # Ints alone pass jax.jit: the step refuses them while it is traced.
    del params["activation"]
    with pytest.raises(TypeError, match=r"1 of 7 leaves.*'steps' \(an array "
                       r"of dtype int32\)"):
      step(params, state, batches(1)[0])

  @pytest.mark.parametrize("dispatch", ["cond", "host", "update"])
  def test_state_of_other_inner_optimizers(self, dispatch):
    # An SGD multirate's state given to an Adam multirate: optax's Adam
    # would read .mu off an EmptyState.
    labels = mo.fast_by_path("^head/")
    adam = mo.multirate(optax.adam(1e-3), labels=labels, period=2)
    for sgd, found in ((optax.sgd(0.1), "EmptyState"),
                       (optax.sgd(0.1, momentum=0.9), "TraceState")):
      state = mo.multirate(sgd, labels=labels, period=2).init(self.params)
      message = (rf"other inner optimizers than this one: group 'fast': the "
                 rf"state holds {found} where this optimizer's init makes "
                 rf"ScaleByAdamState.*group 'slow': the state holds {found} "
                 rf"where .* ScaleByAdamState.*this optimizer's init")
      with pytest.raises(TypeError, match=message):
        if dispatch == "update":
          adam.update(self.params, state, self.params)
        else:
          mo.train_step(mlp_loss, adam, dispatch=dispatch)(
              self.params, state, batches(1)[0])

  @pytest.mark.parametrize("dispatch", ["cond", "host", "update"])
  def test_parameters_of_other_shapes_than_the_state(self, dispatch):
    # A wider hidden layer: the loss runs, the state is for the narrower one
    # (optax would fail to add (17,) and (16,) arrays).
    rng = np.random.default_rng(0)
    wider = dict(self.params,
                 layer0={"w": jnp.asarray(rng.normal(size=(6, 17)), jnp.float32),
                         "b": jnp.zeros(17)},
                 layer1={"w": jnp.asarray(rng.normal(size=(17, 16)), jnp.float32),
                         "b": self.params["layer1"]["b"]})
    message = (r"do not have the shapes the optimizer state was made for: "
               r"parameter 'layer0/b' has shape \(17,\), the state was made "
               r"for \(16,\); parameter 'layer0/w' has shape \(6, 17\), the "
               r"state was made for \(6, 16\); parameter 'layer1/w' has shape "
               r"\(17, 16\), the state was made for \(16, 16\)\. Call this "
               r"optimizer's init on these parameters")
    with pytest.raises(ValueError, match=message):
      if dispatch == "update":
        self.tx.update(wider, self.opt_state, wider)
      else:
        mo.train_step(mlp_loss, self.tx, dispatch=dispatch)(
            wider, self.opt_state, batches(1)[0])
