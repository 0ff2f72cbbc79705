"""Fine-tune a small Flax Linen CNN with multirate training.

Run it (15 to 25 seconds on a 2-core CPU; no download, the digits ship with
scikit-learn):

    python -m pip install -e ".[finetune]"   # once: scikit-learn, tqdm
    python examples/linen_finetune.py

Stand-in for a pretrained network: a CNN (two conv + BatchNorm layers, a dense
layer with dropout) is first trained for a few epochs on the digits 0-4 only.
It then gets a fresh 10-way head and is fine-tuned on all ten digits with
multirate SGD with momentum: the head is fast (updated every step, step size
h/k), the body slow (one step of size h per cycle of k steps, spread over
it). On the other steps the body is not differentiated at all, so those steps
are cheaper. The
progress bar shows the loss, the step time and which steps are slow; at the end
the script prints the mean time of slow and of fast steps and the test
accuracy. ``--period 1`` fine-tunes every parameter on every step, to compare.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sklearn.datasets
import sklearn.model_selection
import tqdm

import multirate_optax as mo


class CNN(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    for features, stride in ((16, 1), (32, 2)):
      x = nn.Conv(features, (3, 3), strides=stride)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)


def load_digits(seed: int):
  """8x8 grey digits as (n, 8, 8, 1) floats in [0, 1]; stratified 75/25 split."""
  digits = sklearn.datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  return sklearn.model_selection.train_test_split(
      images, digits.target.astype(np.int32), test_size=0.25,
      stratify=digits.target, random_state=seed)


def epochs_of_batches(x, y, batch_size: int, epochs: int, seed: int):
  """Shuffled full minibatches, epoch after epoch (a fixed shape: no recompiles)."""
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
      index = order[start:start + batch_size]
      yield x[index], y[index]


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss(model: CNN):
  def loss_fn(params, batch_stats, batch, rng):
    x, y = batch
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    return cross_entropy(logits, y), updates["batch_stats"]
  return loss_fn


def pretrain(x, y, args) -> dict[str, Any]:
  """Trains the whole CNN with Adam on digits 0-4: our "pretrained" network."""
  model = CNN(num_classes=5)
  keep = y < 5
  variables = model.init(jax.random.key(args.seed), x[:1], train=False)
  tx = optax.adam(1e-3)
  loss_fn = make_loss(model)

  @jax.jit
  def step(params, batch_stats, opt_state, batch, rng):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  key = jax.random.key(args.seed + 1)
  batches = epochs_of_batches(x[keep], y[keep], args.batch_size,
                              args.pretrain_epochs, args.seed)
  for t, batch in enumerate(tqdm.tqdm(batches, desc="pretrain on 0-4")):
    params, batch_stats, opt_state, _ = step(
        params, batch_stats, opt_state, batch, jax.random.fold_in(key, t))
  return {"params": params, "batch_stats": batch_stats}


def accuracy(model: CNN, state: mo.linen.TrainState, x, y) -> float:
  logits = jax.jit(model.apply, static_argnames="train")(
      {"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--period", type=int, default=4,
                      help="k: the body's gradient is taken every k-th step")
  parser.add_argument("--lr", type=float, default=0.2,
                      help="h: the body's step per cycle; the head's is h/k")
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--pretrain-epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  start = time.perf_counter()

  x_train, x_test, y_train, y_test = load_digits(args.seed)
  pretrained = pretrain(x_train, y_train, args)

  # The pretrained body with a fresh 10-way head.
  model = CNN(num_classes=10)
  variables = model.init(jax.random.key(args.seed + 2), x_train[:1], train=False)
  params = dict(pretrained["params"], head=variables["params"]["head"])
  tx = mo.multirate(optax.sgd(args.lr / args.period, momentum=0.9),
                    optax.sgd(args.lr, momentum=0.9),
                    labels=mo.fast_by_path("^head/"), period=args.period)
  state = mo.linen.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      batch_stats=pretrained["batch_stats"])
  step = mo.linen.train_step(make_loss(model))
  print(f"fine-tuning with period k={args.period}, {step.dispatch!r} dispatch; "
        f"test accuracy before: {accuracy(model, state, x_test, y_test):.3f}")

  timetable = mo.find_timetable_state(state.opt_state).timetable
  key = jax.random.key(args.seed + 3)
  seconds = {"slow": [], "fast": []}
  batches = epochs_of_batches(x_train, y_train, args.batch_size, args.epochs,
                              args.seed)
  progress = tqdm.tqdm(batches, desc="fine-tune",
                       total=args.epochs * (len(x_train) // args.batch_size))
  for t, batch in enumerate(progress):
    kind = "slow" if timetable.is_slow_step(state.step) else "fast"
    tic = time.perf_counter()
    state, loss = step(state, batch, jax.random.fold_in(key, t))
    loss = float(loss)  # waits for the step to finish
    seconds[kind].append(time.perf_counter() - tic)
    progress.set_postfix(loss=f"{loss:.3f}",
                         step=f"{1e3 * seconds[kind][-1]:.1f}ms", kind=kind)

  # The first step of each kind compiles its program: leave it out.
  for kind, times in seconds.items():
    if len(times) > 1:
      print(f"{kind} steps: {len(times)}, mean {1e3 * np.mean(times[1:]):.2f} ms")
  print(f"test accuracy: {accuracy(model, state, x_test, y_test):.3f}")
  print(f"total run time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
