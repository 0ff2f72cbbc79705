"""Optimizer pieces whose numbers live in the state, not in the program.

A method's runs differ in their learning rates (grid points) and in the length
of their cosine decay (each run plans as many steps as fit in its time budget,
:mod:`experiments.finetune.budget`). Both are arrays in the optimizer state
here, so one compiled train step serves every run of a method: a constant
baked into the program would compile the step again for every run, and on the
text model a compilation costs as much as tens of steps.

* :func:`cosine_decay`: updates times ``(1 + cos(pi min(t / total, 1))) / 2``,
  ``total`` in the state (optax's schedules take it as a Python number).
* :func:`rescale_decay`: a state's decay lengths stretched, for a run
  re-planned on the way (:func:`experiments.finetune.training.train_and_evaluate`).
* :func:`scale_by_rates`: updates times ``-rate`` of each leaf's group, the
  rates in the state (several rates in one optimizer: AdamW's encoder and head
  rates).
* :func:`sgd_momentum`, :func:`adamw`: the tasks' two families built on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import multirate_optax as mo

PyTree = Any


class CosineDecayState(NamedTuple):
  """Updates seen so far, and the steps over which the factor decays to 0."""
  count: jax.Array
  total: jax.Array


def cosine_decay(total: float) -> optax.GradientTransformation:
  """Scales the ``t``-th update (from 0) by ``(1 + cos(pi min(t / total, 1))) / 2``.

  The factor of :func:`optax.cosine_decay_schedule` with ``decay_steps=total``
  and ``alpha=0``; ``total`` may be fractional (a multirate slow optimizer,
  whose count advances once per cycle, decays over ``steps / period``).

  Example:
    >>> import jax.numpy as jnp
    >>> decay = cosine_decay(4)
    >>> state = decay.init(None)
    >>> factors = []
    >>> for _ in range(6):
    ...   update, state = decay.update(jnp.ones(()), state)
    ...   factors.append(round(float(update), 3))
    >>> factors
    [1.0, 0.854, 0.5, 0.146, 0.0, 0.0]
  """
  if not total > 0:
    raise ValueError(f"total must be positive, got {total!r}.")

  def init(params):
    del params
    return CosineDecayState(jnp.zeros((), jnp.int32),
                            jnp.asarray(total, jnp.float32))

  def update(updates, state, params=None):
    del params
    progress = jnp.minimum(state.count / state.total, 1.0)
    factor = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    return updates, CosineDecayState(state.count + 1, state.total)

  return optax.GradientTransformation(init, update)


def rescale_decay(opt_state: PyTree, factor: float) -> PyTree:
  """``opt_state`` with the length of every :func:`cosine_decay` times ``factor``.

  A run re-planned to ``factor`` times as many steps: the fast and the slow
  optimizers' decays (``steps`` and ``steps / k``) stretch alike. Counts and
  every other entry are kept, and the new lengths are arrays of the same
  dtype, so the compiled step does not compile again.

  Example:
    >>> state = rescale_decay(cosine_decay(10).init(None), 1.5)
    >>> float(state.total)
    15.0
  """
  is_decay = lambda node: isinstance(node, CosineDecayState)
  return jax.tree.map(
      lambda node: node._replace(total=(node.total * factor).astype(
          node.total.dtype)) if is_decay(node) else node,
      opt_state, is_leaf=is_decay)


class RatesState(NamedTuple):
  """The learning rate of each group, by name."""
  rates: dict[str, jax.Array]


def scale_by_rates(rates: Mapping[str, float],
                   group_of: Callable[[str], str]) -> optax.GradientTransformation:
  """Multiplies each update leaf by ``-rates[group_of(path)]``.

  Args:
    rates: a learning rate per group name; kept in the state.
    group_of: a leaf's '/'-joined parameter path to its group's name.
      Leaves masked out by ``optax.partition`` (a multirate fast or slow
      optimizer sees only its own) are skipped.
  """
  names = dict(rates)

  def init(params):
    del params
    return RatesState({name: jnp.asarray(rate, jnp.float32)
                       for name, rate in names.items()})

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: (-state.rates[group_of(mo.path_str(path))]
                         * u).astype(u.dtype), updates)
    return scaled, state

  return optax.GradientTransformation(init, update)


def sgd_momentum(rate: float, momentum: float,
                 total: float) -> optax.GradientTransformation:
  """SGD with (heavy-ball) momentum, its rate decayed to 0 over ``total`` steps."""
  return optax.chain(optax.trace(decay=momentum), cosine_decay(total),
                     scale_by_rates({"rate": rate}, lambda path: "rate"))


def adamw(rates: Mapping[str, float], group_of: Callable[[str], str],
          weight_decay: float, total: float) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, PyTorch's defaults otherwise) with a rate
  per group, every rate decayed to 0 over ``total`` steps (cosine).

  The decay is scaled by each group's rate, as in ``torch.optim.AdamW``.
  """
  return optax.chain(optax.scale_by_adam(),
                     optax.add_decayed_weights(weight_decay),
                     cosine_decay(total), scale_by_rates(rates, group_of))
