"""One training run of a fine-tuning method, and its accuracy.

The plain methods differentiate only their trained top-level modules
(``jax.value_and_grad`` of the trained subtree, one jitted step with donated
buffers); multirate uses :func:`multirate_optax.train_step`, whose fast steps
differentiate only the fast modules.

Learning rates. Multirate gets two: the fast rate ``h_F`` (the fast
parameters' SGD step size, every step) and the slow rate ``h_S``, the slow
parameters' step size per slow update, i.e. per cycle of k steps: without
drift ``θ_S -= h_S p_S`` on each slow step (``slow_scale=1``); with drift the
same displacement is spread over the cycle, ``θ_S -= (h_S / k) p_S`` on every
step (``slow_scale=1/k``). The paper's coupling is ``h_S = k h_F``; here both
are free.

Timing: every train-step program (each multirate phase) is compiled and run
first on a throwaway copy of the state; that compilation and warm-up time is
reported separately. Training time is the wall-clock of the training loop (host
batching included, evaluation excluded), blocked on the final state.
Depthwise convolutions run as sums of shifted products
(:mod:`experiments.models.depthwise`), several times faster than XLA:CPU's
depthwise convolution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import Dataset, shuffled_batches
from experiments.finetune.settings import (
    Method, Rates, Settings, top_module, trained_modules)
from experiments.models import replace_classifier
from experiments.models.depthwise import depthwise_as_shifts
import multirate_optax as mo

PyTree = Any


def sgd(learning_rate: float, momentum: float, decay_steps: int,
        period: int = 1) -> optax.GradientTransformation:
  """SGD with momentum, the rate decayed to 0 over ``decay_steps`` (cosine).

  The rate's peak lives in the optimizer state (so one compiled step serves
  every grid point) and the decay's shape in the program. ``period`` > 1 is
  for a multirate slow optimizer, whose count advances once per cycle.
  """
  shape = optax.cosine_decay_schedule(1.0, decay_steps)
  if period > 1:
    shape = mo.in_slow_steps(shape, period)
  return optax.chain(
      optax.trace(decay=momentum),
      optax.scale_by_schedule(shape),
      optax.inject_hyperparams(optax.scale_by_learning_rate)(
          learning_rate=learning_rate))


def make_optimizer(method: Method, rates: Rates, settings: Settings,
                   steps: int) -> optax.GradientTransformation:
  """The method's optimizer for ``steps`` train steps.

  For plain methods it is the optimizer of the trained subtree only.
  """
  if not method.multirate:
    return sgd(rates["learning_rate"], settings.momentum, steps)
  period = method.period_in(settings)
  return mo.multirate(
      sgd(rates["fast_learning_rate"], settings.momentum, steps),
      sgd(rates["slow_learning_rate"], settings.momentum, steps, period),
      labels=mo.fast_by_path(lambda path: top_module(path) in method.fast),
      period=period, drift=method.drift,
      # h_S per cycle: all on the slow step, or spread over the cycle.
      slow_scale=1.0 / period if method.drift else 1.0)


def make_loss(model: nn.Module, bn: str) -> Callable[..., Any]:
  """``loss(params, batch_stats, images, labels, key, step) -> (loss, batch_stats)``.

  Dropout and stochastic depth are on, with a key folded from ``key`` and the
  step number. With ``bn='frozen'`` BatchNorm normalises with the running
  statistics and ``batch_stats`` comes back unchanged; with ``'train'`` it
  normalises with the batch's and comes back updated.
  """

  def loss(params, batch_stats, images, labels, key, step):
    variables = {"params": params, "batch_stats": batch_stats}
    rngs = {"dropout": jax.random.fold_in(key, step)}
    with depthwise_as_shifts():
      if bn == "train":
        logits, updated = model.apply(variables, images, train=True,
                                      rngs=rngs, mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
      else:
        logits = model.apply(variables, images, train=False,
                             deterministic=False, rngs=rngs)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return value.mean(), batch_stats

  return loss


def subtree_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                 trained: Sequence[str]) -> Callable[..., Any]:
  """A plain jitted step that differentiates only the top-level modules ``trained``.

  Same call as :class:`multirate_optax.TrainStep` with ``has_aux=True``:
  ``params, opt_state, (loss, aux) = step(params, opt_state, *args)``, with
  ``opt_state`` the optimizer's state for the trained subtree.
  """

  def step(params, opt_state, *args):
    subtree = {name: params[name] for name in trained}
    value, grads = jax.value_and_grad(
        lambda subtree: loss_fn({**params, **subtree}, *args), has_aux=True)(
            subtree)
    updates, opt_state = optimizer.update(grads, opt_state, subtree)
    return ({**params, **optax.apply_updates(subtree, updates)}, opt_state,
            value)

  return jax.jit(step, donate_argnums=(0, 1))


def make_step(method: Method, loss_fn: Callable[..., Any],
              optimizer: optax.GradientTransformation,
              params: Mapping[str, Any]) -> Callable[..., Any]:
  """The method's compiled train step."""
  if method.multirate:
    return mo.train_step(loss_fn, optimizer, has_aux=True)
  return subtree_step(loss_fn, optimizer, trained_modules(method, params))


def init_optimizer_state(method: Method, optimizer: optax.GradientTransformation,
                         params: Mapping[str, Any]) -> optax.OptState:
  if method.multirate:
    return optimizer.init(params)
  return optimizer.init(
      {name: params[name] for name in trained_modules(method, params)})


def run_steps(step, params, opt_state, batch_stats,
              batches: Iterable[tuple[np.ndarray, np.ndarray]],
              key: jax.Array) -> tuple[PyTree, PyTree]:
  """Runs ``step`` on every batch; returns the final params and batch_stats."""
  for number, (images, labels) in enumerate(batches):
    params, opt_state, (_, batch_stats) = step(
        params, opt_state, batch_stats, images, labels, key, np.int32(number))
  return jax.block_until_ready((params, batch_stats))


def epochs_of_batches(data: Dataset, settings: Settings, seed: int,
                      on_epoch: Callable[[], None]) -> Iterator[tuple]:
  for epoch in range(settings.epochs):
    yield from shuffled_batches(data.images, data.labels, settings.batch_size,
                                seed=seed, epoch=epoch)
    on_epoch()


def dropout_key(seed: int) -> jax.Array:
  """The key of a run's dropout and stochastic depth.

  The 'rbg' implementation: on a 2-core CPU it made a classifier-only step
  about 2 ms (a sixth) faster than the default threefry. Warm-up and runs must
  use the same implementation, or the step compiles again.
  """
  return jax.random.key(seed, impl="rbg")


def fresh_variables(pretrained: tuple[nn.Module, PyTree], seed: int,
                    num_classes: int) -> tuple[nn.Module, PyTree]:
  """A copy of the pretrained variables with a new ``num_classes`` classifier.

  A copy, because train steps donate (and so delete) the buffers they get.
  """
  model, variables = pretrained
  copied = jax.tree.map(lambda x: jnp.array(x, copy=True), variables)
  return replace_classifier(model, copied, num_classes,
                            jax.random.fold_in(jax.random.key(seed), 0))


def fine_tune(step, method: Method, optimizer: optax.GradientTransformation,
              variables: PyTree, data: Dataset, settings: Settings, seed: int,
              on_epoch: Callable[[], None]) -> tuple[PyTree, float]:
  """Trains from ``variables``; returns the trained variables and the seconds."""
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = init_optimizer_state(method, optimizer, params)
  batches = epochs_of_batches(data, settings, seed, on_epoch)
  start = time.perf_counter()
  params, batch_stats = run_steps(step, params, opt_state, batch_stats,
                                  batches, dropout_key(seed))
  seconds = time.perf_counter() - start
  return {"params": params, "batch_stats": batch_stats}, seconds


def warm_up(step, method: Method, optimizer: optax.GradientTransformation,
            variables: PyTree, data: Dataset, settings: Settings) -> float:
  """Compiles every program of ``step`` on ``variables`` (a throwaway copy).

  Two steps: the first is a multirate slow step, the second a fast one.

  Returns:
    The seconds taken (compilation and one run of each program).
  """
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = init_optimizer_state(method, optimizer, params)
  batch = (data.images[:settings.batch_size], data.labels[:settings.batch_size])
  start = time.perf_counter()
  run_steps(step, params, opt_state, batch_stats, [batch] * 2,
            dropout_key(0))
  return time.perf_counter() - start


def make_predict(model: nn.Module) -> Callable[[PyTree, np.ndarray], jax.Array]:
  """Jitted predicted classes, BatchNorm and dropout in inference mode."""

  def predict(variables, images):
    with depthwise_as_shifts():
      return jnp.argmax(model.apply(variables, images), axis=-1)

  return jax.jit(predict)


def accuracy(predict, variables: PyTree, data: Dataset,
             batch_size: int) -> float:
  """Share of ``data`` classified correctly, in batches of one fixed size."""
  correct = 0
  for start in range(0, len(data.labels), batch_size):
    images = data.images[start:start + batch_size]
    padded = np.pad(images, ((0, batch_size - len(images)),)
                    + ((0, 0),) * (images.ndim - 1))
    predicted = np.asarray(predict(variables, padded))[:len(images)]
    correct += int(np.sum(predicted == data.labels[start:start + batch_size]))
  return correct / len(data.labels)
