"""Fine-tune a small Flax NNX CNN with multirate training.

Run it (15 to 25 seconds on a 2-core CPU; no download, the digits ship with
scikit-learn):

    python -m pip install -e ".[finetune]"   # once: scikit-learn, tqdm
    python examples/nnx_finetune.py

Stand-in for a pretrained network: a CNN (two conv + BatchNorm layers, a dense
layer with dropout) is first trained for a few epochs on the digits 0-4 only.
It then gets a fresh 10-way head and is fine-tuned on all ten digits with
multirate SGD with momentum inside an ``nnx.Optimizer``: the parameters that
the filter ``nnx.PathContains('head')`` selects are fast (updated every step,
step size h/k), the body is slow (one step of size h per cycle of k steps,
spread over it). On the other steps the body is not differentiated at all, so
those steps are cheaper. The progress bar shows the loss, the step time and which steps are
slow; at the end the script prints the mean time of slow and of fast steps and
the test accuracy. ``--period 1`` fine-tunes every parameter on every step, to
compare.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
import sklearn.datasets
import sklearn.model_selection
import tqdm
from flax import nnx

import multirate_optax as mo


class CNN(nnx.Module):

  def __init__(self, num_classes: int, rngs: nnx.Rngs):
    self.conv0 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.norm0 = nnx.BatchNorm(16, rngs=rngs)
    self.conv1 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.norm1 = nnx.BatchNorm(32, rngs=rngs)
    self.dense = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm0(self.conv0(x)))
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = self.dropout(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))
    return self.head(x)


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


def loss_fn(model: CNN, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def pretrain(x, y, args) -> CNN:
  """Trains the whole CNN with Adam on digits 0-4: our "pretrained" network."""
  model = CNN(num_classes=5, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  keep = y < 5
  batches = epochs_of_batches(x[keep], y[keep], args.batch_size,
                              args.pretrain_epochs, args.seed)
  for batch in tqdm.tqdm(batches, desc="pretrain on 0-4"):
    step(model, optimizer, *batch)
  return model


def accuracy(model: CNN, x, y) -> float:
  model.eval()
  logits = nnx.jit(lambda model, x: model(x))(model, x)
  model.train()
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
  model = pretrain(x_train, y_train, args)

  # The pretrained body with a fresh 10-way head.
  model.head = nnx.Linear(64, 10, rngs=nnx.Rngs(args.seed + 2))
  tx = mo.multirate(optax.sgd(args.lr / args.period, momentum=0.9),
                    optax.sgd(args.lr, momentum=0.9),
                    labels=mo.nnx.fast_by_filter(nnx.PathContains("head")),
                    period=args.period)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = mo.nnx.train_step(loss_fn)
  print(f"fine-tuning with period k={args.period}, {step.dispatch!r} dispatch; "
        f"test accuracy before: {accuracy(model, x_test, y_test):.3f}")

  timetable = mo.find_timetable_state(optimizer.opt_state).timetable
  seconds = {"slow": [], "fast": []}
  batches = epochs_of_batches(x_train, y_train, args.batch_size, args.epochs,
                              args.seed)
  progress = tqdm.tqdm(batches, desc="fine-tune",
                       total=args.epochs * (len(x_train) // args.batch_size))
  for t, batch in enumerate(progress):
    kind = "slow" if timetable.is_slow_step(t) else "fast"
    tic = time.perf_counter()
    loss = float(step(model, optimizer, *batch))  # waits for the step
    seconds[kind].append(time.perf_counter() - tic)
    progress.set_postfix(loss=f"{loss:.3f}",
                         step=f"{1e3 * seconds[kind][-1]:.1f}ms", kind=kind)

  # The first step of each kind compiles its program: leave it out.
  for kind, times in seconds.items():
    if len(times) > 1:
      print(f"{kind} steps: {len(times)}, mean {1e3 * np.mean(times[1:]):.2f} ms")
  print(f"test accuracy: {accuracy(model, x_test, y_test):.3f}")
  print(f"total run time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
