"""The Equinox step's own parts: where-labels, State, static fields, the core's bits."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multirate_optax as mo
from _models import batches, mlp_params
from _probes import count_compilations
from _steps import EquinoxMLP, equinox_loss


def _adam():
  return mo.multirate(optax.adam(1e-2), period=3,
                      labels=mo.equinox.fast_by_where(lambda m: m.head))


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_trajectory_is_the_core_steps_on_the_partitioned_model(dispatch):
  model = EquinoxMLP(mlp_params())
  params, static = eqx.partition(model, eqx.is_inexact_array)
  tx = _adam()
  core = mo.train_step(
      lambda p, b: equinox_loss(eqx.combine(p, static), b), tx,
      dispatch=dispatch)
  step = mo.equinox.train_step(equinox_loss, tx, dispatch=dispatch)
  m, s = model, tx.init(params)
  p, cs = params, tx.init(params)
  for batch in batches(7):
    m, s, loss = step(m, s, batch)
    p, cs, core_loss = core(p, cs, batch)
    assert loss == core_loss
  chex.assert_trees_all_equal(eqx.filter(m, eqx.is_inexact_array), p)
  assert m.layer0.activation is jnp.tanh


class Net(eqx.Module):
  body: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.body = eqx.nn.Linear(6, 8, key=k1)
    self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
    self.head = eqx.nn.Linear(8, 3, key=k2)

  def __call__(self, x, state):
    x, state = self.norm(jnp.tanh(self.body(x)), state)
    return self.head(x), state


def _stateful_loss(model, state, batch):
  x, y = batch
  logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                           out_axes=(0, None))(x, state)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


@pytest.mark.parametrize("dispatch", ["cond", "host"])
def test_batchnorm_state_moves_on_fast_and_slow_steps(dispatch):
  model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
  tx = mo.multirate(optax.sgd(0.1), period=3, drift=False,
                    labels=mo.equinox.fast_by_where(lambda m: m.head))
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  step = mo.equinox.train_step(_stateful_loss, tx, has_aux=True,
                               dispatch=dispatch)
  for t, batch in enumerate(batches(6)):
    # Plain Equinox's forward pass from the same model and state.
    _, want = _stateful_loss(model, state, batch)
    before = model
    model, opt_state, (loss, state) = step(model, opt_state, state, batch)
    chex.assert_trees_all_close(state, want, rtol=1e-5, atol=1e-6)
    body_moved = not np.array_equal(before.body.weight, model.body.weight)
    assert body_moved == (t % 3 == 0)  # Slow: moved on slow steps only.
    assert not np.array_equal(before.head.weight, model.head.weight)


def test_static_fields_compile_once_per_value():
  model = EquinoxMLP(mlp_params())
  tx = _adam()
  step = mo.equinox.train_step(equinox_loss, tx, dispatch="cond")
  s = tx.init(eqx.filter(model, eqx.is_inexact_array))
  data = batches(4)
  model, s, _ = step(model, s, data[0])
  with count_compilations() as compiled:
    model, s, _ = step(model, s, data[1])
    assert compiled[0] == 0
    relu = eqx.tree_at(lambda m: m.layer0.activation, model, jax.nn.relu)
    relu, s, _ = step(relu, s, data[2])
    assert compiled[0] >= 1 and relu.layer0.activation is jax.nn.relu


def test_where_labels_and_refusals():
  params = eqx.filter(EquinoxMLP(mlp_params()), eqx.is_inexact_array)
  labels = mo.equinox.fast_by_where(lambda m: (m.head, m.layer1.b))(params)
  assert (labels.layer0.w, labels.layer1.w, labels.layer1.b,
          labels.head.w) == ("slow", "slow", "fast", "fast")
  with pytest.raises(ValueError, match="selects none of the 6 parameters"):
    mo.equinox.fast_by_filter(lambda x: x.ndim == 3)(params)
  tx = _adam()
  step = mo.equinox.train_step(equinox_loss, tx, filter_spec=lambda x: (
      eqx.is_inexact_array(x) and x.ndim == 2))
  with pytest.raises(ValueError, match=r"3 parameter leaves.*made for 6.*"
                     r"eqx.filter\(model, filter_spec\)"):
    step(EquinoxMLP(mlp_params()), tx.init(params), batches(1)[0])
