"""The same MLP under each train step: core, Linen, NNX and Equinox, behind one face.

A harness holds one model, its multirate optimizer and a train step, and
exposes what the behaviour battery (tests/test_steps.py) needs: run a step,
read the parameters in tests/_models.py's naming, lower a phase's program,
snapshot and rewind the training state, and run the step (its ``apply``, or
the step itself) inside the user's own jit.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import multirate_optax as mo
from _models import SIZES, mlp_loss, mlp_params

H, MU = 0.2, 0.9
NAMES = ("layer0", "layer1", "head")
FLAVOURS = ("core", "linen", "nnx", "equinox")


def multirate_sgd_tx(period: int, drift: bool, labels) -> optax.GradientTransformation:
  # Vlaar & Leimkuhler's h_F = h / k, h_S = h (per cycle).
  return mo.multirate(optax.sgd(H / period, momentum=MU),
                      optax.sgd(H, momentum=MU), labels=labels,
                      period=period, drift=drift)


def cross_entropy(logits, y):
  return -jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(logits), y[:, None], axis=1))


class CoreHarness:
  """``mo.train_step`` on the plain-dict MLP of tests/_models.py."""

  def __init__(self, period, *, drift=False, dispatch="auto", donate=False,
               wrap=lambda tx: tx):
    self.tx = wrap(multirate_sgd_tx(period, drift, mo.fast_by_path("^head/")))
    self.train_step = mo.train_step(mlp_loss, self.tx, dispatch=dispatch,
                                    donate=donate)
    self.state = (mlp_params(), self.tx.init(mlp_params()))

  def step(self, batch):
    params, opt_state, loss = self.train_step(*self.state, batch)
    self.state = (params, opt_state)
    return loss

  def step_inside_jit(self, batch, method="apply"):
    params, opt_state, loss = jax.jit(getattr(self.train_step, method))(
        *self.state, batch)
    self.state = (params, opt_state)
    return loss

  def params(self):
    return jax.tree.map(np.array, self.state[0])

  def count(self):
    return int(mo.find_timetable_state(self.state[1]).count)

  def program(self, batch, phase=None):
    return self.train_step.program(*self.state, batch, phase=phase)

  def snapshot(self, copy=True):
    return jax.tree.map(jnp.array, self.state) if copy else self.state

  def rewind(self, snapshot):
    self.state = snapshot


class LinenMLP(nn.Module):
  """The MLP of tests/_models.py as a Linen module."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16, name="layer0")(x))
    x = jnp.tanh(nn.Dense(16, name="layer1")(x))
    return nn.Dense(3, name="head")(x)


def linen_params(params):
  return {name: {"kernel": params[name]["w"], "bias": params[name]["b"]}
          for name in NAMES}


def linen_loss(params, batch, rng):
  del rng  # No dropout: passed to check that the step hands it over.
  x, y = batch
  return cross_entropy(LinenMLP().apply({"params": params}, x), y)


class LinenHarness:
  """``mo.linen.train_step`` on a ``mo.linen.TrainState``."""

  def __init__(self, period, *, drift=False, dispatch="auto", donate=False,
               wrap=lambda tx: tx):
    self.tx = wrap(multirate_sgd_tx(period, drift, mo.fast_by_path("^head/")))
    self.train_step = mo.linen.train_step(linen_loss, dispatch=dispatch,
                                          donate=donate)
    self.state = mo.linen.TrainState.create(
        apply_fn=LinenMLP().apply, params=linen_params(mlp_params()),
        tx=self.tx)
    self._key = jax.random.key(0)

  def _rng(self):
    return jax.random.fold_in(self._key, self.state.step)

  def step(self, batch):
    self.state, loss = self.train_step(self.state, batch, self._rng())
    return loss

  def step_inside_jit(self, batch, method="apply"):
    self.state, loss = jax.jit(getattr(self.train_step, method))(
        self.state, batch, self._rng())
    return loss

  def params(self):
    return {name: {"w": np.array(self.state.params[name]["kernel"]),
                   "b": np.array(self.state.params[name]["bias"])}
            for name in NAMES}

  def count(self):
    return int(mo.find_timetable_state(self.state.opt_state).count)

  def program(self, batch, phase=None):
    return self.train_step.program(self.state, batch, self._rng(), phase=phase)

  def snapshot(self, copy=True):
    return jax.tree.map(jnp.array, self.state) if copy else self.state

  def rewind(self, snapshot):
    self.state = snapshot


class NNXMLP(nnx.Module):
  """The MLP of tests/_models.py as an nnx.Module."""

  def __init__(self, params):
    rngs = nnx.Rngs(0)
    for name, (n_in, n_out) in zip(NAMES, zip(SIZES[:-1], SIZES[1:])):
      layer = nnx.Linear(n_in, n_out, rngs=rngs)
      layer.kernel.set_value(params[name]["w"])
      layer.bias.set_value(params[name]["b"])
      setattr(self, name, layer)

  def __call__(self, x):
    return self.head(jnp.tanh(self.layer1(jnp.tanh(self.layer0(x)))))


def nnx_loss(model, batch):
  x, y = batch
  return cross_entropy(model(x), y)


class NNXHarness:
  """``mo.nnx.train_step`` on an ``nnx.Module`` and its ``nnx.Optimizer``."""

  def __init__(self, period, *, drift=False, dispatch="auto", donate=False,
               wrap=lambda tx: tx):
    self.tx = wrap(multirate_sgd_tx(
        period, drift, mo.nnx.fast_by_filter(nnx.PathContains("head"))))
    self.train_step = mo.nnx.train_step(nnx_loss, dispatch=dispatch,
                                        donate=donate)
    self.model = NNXMLP(mlp_params())
    self.optimizer = nnx.Optimizer(self.model, self.tx, wrt=nnx.Param)

  def step(self, batch):
    return self.train_step(self.model, self.optimizer, batch)

  def step_inside_jit(self, batch, method="apply"):
    return nnx.jit(getattr(self.train_step, method))(
        self.model, self.optimizer, batch)

  def params(self):
    return {name: {"w": np.array(getattr(self.model, name).kernel.get_value()),
                   "b": np.array(getattr(self.model, name).bias.get_value())}
            for name in NAMES}

  def count(self):
    return int(mo.find_timetable_state(self.optimizer.opt_state).count.get_value())

  def program(self, batch, phase=None):
    return self.train_step.program(self.model, self.optimizer, batch,
                                   phase=phase)

  def snapshot(self, copy=True):
    state = nnx.as_pure((nnx.state(self.model), nnx.state(self.optimizer)))
    return jax.tree.map(jnp.array, state) if copy else state

  def rewind(self, snapshot):
    nnx.update(self.model, snapshot[0])
    nnx.update(self.optimizer, snapshot[1])


class EquinoxDense(eqx.Module):
  """A dense layer as in tests/_models.py, with a static field."""

  w: jax.Array
  b: jax.Array
  activation: object  # A function: static for the step, not a parameter.

  def __call__(self, x):
    return self.activation(x @ self.w + self.b)


class EquinoxMLP(eqx.Module):
  """The MLP of tests/_models.py as an eqx.Module, functions among its leaves."""

  layer0: EquinoxDense
  layer1: EquinoxDense
  head: EquinoxDense

  def __init__(self, params):
    for name in NAMES:
      activation = (lambda x: x) if name == "head" else jnp.tanh
      setattr(self, name, EquinoxDense(params[name]["w"], params[name]["b"],
                                       activation))

  def __call__(self, x):
    return self.head(self.layer1(self.layer0(x)))


def equinox_loss(model, batch):
  x, y = batch
  return cross_entropy(model(x), y)


class EquinoxHarness:
  """``mo.equinox.train_step`` on the whole ``eqx.Module``."""

  def __init__(self, period, *, drift=False, dispatch="auto", donate=False,
               wrap=lambda tx: tx):
    self.tx = wrap(multirate_sgd_tx(
        period, drift, mo.equinox.fast_by_where(lambda m: m.head)))
    self.train_step = mo.equinox.train_step(equinox_loss, self.tx,
                                            dispatch=dispatch, donate=donate)
    model = EquinoxMLP(mlp_params())
    self.state = (model, self.tx.init(eqx.filter(model, eqx.is_inexact_array)))

  def step(self, batch):
    model, opt_state, loss = self.train_step(*self.state, batch)
    self.state = (model, opt_state)
    return loss

  def step_inside_jit(self, batch, method="apply"):
    # A new function each call, traced anew as the other harnesses' jits are.
    step = getattr(self.train_step, method)
    model, opt_state, loss = eqx.filter_jit(lambda *args: step(*args))(
        *self.state, batch)
    self.state = (model, opt_state)
    return loss

  def params(self):
    return {name: {"w": np.array(getattr(self.state[0], name).w),
                   "b": np.array(getattr(self.state[0], name).b)}
            for name in NAMES}

  def count(self):
    return int(mo.find_timetable_state(self.state[1]).count)

  def program(self, batch, phase=None):
    return self.train_step.program(*self.state, batch, phase=phase)

  def snapshot(self, copy=True):
    if not copy:
      return self.state
    return jax.tree.map(lambda x: jnp.array(x) if eqx.is_array(x) else x,
                        self.state)

  def rewind(self, snapshot):
    self.state = snapshot


HARNESSES = {"core": CoreHarness, "linen": LinenHarness, "nnx": NNXHarness,
             "equinox": EquinoxHarness}


def train(harness, data):
  """Runs one step per batch; the parameters after every step."""
  history = []
  for batch in data:
    harness.step(batch)
    history.append(harness.params())
  return history
