"""Random-subgroup multirate against SGD and SGD with dropout, training from scratch.

An MLP (64-512-512-10, ReLU) learns scikit-learn's 8x8 digits from scratch,
with SGD (momentum 0.9) and the same number of steps, minibatches and learning
rate for every method:

  sgd               plain SGD;
  dropout p         SGD with dropout of rate p on the hidden activations;
  subgroups f/k     multirate_optax.random_subgroups: every k steps a new
                    random share f of the weights becomes slow; on the k - 1
                    fast steps in between the slow weights are zero in the
                    forward pass and only the fast ones move; every k-th step
                    is a full step on all weights.

Each method runs with several seeds (initialisation, minibatch order and
subgroup draws). The validation loss is recorded after every epoch (for
random subgroups, with every weight in place: multirate_optax.full_weights),
plotted as mean curves (PNG), and the final and best validation loss and the
test accuracy are printed as a table and written as JSON.

Run from the repository root::

  python -m benchmarks.random_subgroups --quick --json results/random_subgroups.json \\
      --plot results/random_subgroups.png
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import multirate_optax as mo
from benchmarks._report import write_json
from experiments.data import load_digits_splits, shuffled_batches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = (64, 512, 512, 10)
LEARNING_RATE, MOMENTUM = 0.01, 0.9


def init_mlp(key: jax.Array) -> dict:
  params = {}
  for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
        "w": jax.random.normal(sub, (n_in, n_out)) * np.sqrt(2.0 / n_in),
        "b": jnp.zeros(n_out)}
  return params


def mlp(params: dict, x: jax.Array, dropout: float = 0.0,
        key: jax.Array | None = None) -> jax.Array:
  layers = list(params.values())
  for i, layer in enumerate(layers):
    x = x @ layer["w"] + layer["b"]
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
      if dropout:
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1 - dropout,
                                    x.shape)
        x = jnp.where(keep, x / (1 - dropout), 0.0)
  return x


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(params, x, y):
  return cross_entropy(mlp(params, x), y)


def sgd_step(dropout: float):
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  @jax.jit
  def step(params, opt_state, x, y, key):
    grads = jax.grad(lambda p: cross_entropy(mlp(p, x, dropout, key), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


@jax.jit
def _loss_and_accuracy(params, x, y):
  logits = mlp(params, x)
  return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def evaluate(params, x, y) -> tuple[float, float]:
  return tuple(map(float, _loss_and_accuracy(params, x, y)))


def run(method: dict, splits, epochs: int, batch_size: int, seed: int) -> dict:
  key = jax.random.key(seed)
  params = init_mlp(key)
  if method["kind"] == "subgroups":
    tx = mo.random_subgroups(
        optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
        fraction=method["fraction"], period=method["period"],
        key=jax.random.fold_in(key, 1))
    train_step = mo.train_step(loss_fn, tx)
    step = lambda params, opt_state, x, y, t: train_step(
        params, opt_state, x, y)[:2]
    weights = mo.full_weights
  else:
    tx, sgd = sgd_step(method.get("dropout", 0.0))
    step = lambda params, opt_state, x, y, t: sgd(
        params, opt_state, x, y, jax.random.fold_in(key, t))
    weights = lambda params, opt_state: params
  opt_state = tx.init(params)
  validation = []
  t = 0
  start = time.perf_counter()
  for epoch in range(epochs):
    for x, y in shuffled_batches(splits.train.images, splits.train.labels,
                                 batch_size, seed=seed, epoch=epoch):
      params, opt_state = step(params, opt_state, x, y, t)
      t += 1
    validation.append(evaluate(weights(params, opt_state),
                               splits.validation.images,
                               splits.validation.labels)[0])
  seconds = time.perf_counter() - start
  final = weights(params, opt_state)
  test_loss, test_accuracy = evaluate(final, splits.test.images,
                                      splits.test.labels)
  train_loss, _ = evaluate(final, splits.train.images, splits.train.labels)
  return dict(validation_loss=validation, test_loss=test_loss,
              test_accuracy=test_accuracy, train_loss=train_loss,
              seconds=seconds)


def flat_digits(image_size: int, seed: int):
  """The digits splits as flat 8x8 grey vectors (one channel of the RGB)."""
  splits = load_digits_splits(image_size=image_size, seed=seed)
  return type(splits)(*(
      type(d)(jnp.asarray(d.images[..., 0].reshape(len(d.labels), -1)),
              jnp.asarray(d.labels)) for d in splits))


def summary(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), (statistics.stdev(values)
                                   if len(values) > 1 else 0.0)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer epochs and seeds (< 1 minute)")
  parser.add_argument("--json", type=Path, help="write the results to this file")
  parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--batch-size", type=int, default=32)
  args = parser.parse_args(argv)
  args.epochs = args.epochs or (30 if args.quick else 100)
  args.seeds = args.seeds or (1 if args.quick else 3)

  methods = [
      dict(name="sgd", kind="sgd"),
      dict(name="dropout 0.2", kind="sgd", dropout=0.2),
      dict(name="dropout 0.5", kind="sgd", dropout=0.5),
      dict(name="subgroups 0.5/2", kind="subgroups", fraction=0.5, period=2),
      dict(name="subgroups 0.5/5", kind="subgroups", fraction=0.5, period=5),
      dict(name="subgroups 0.2/2", kind="subgroups", fraction=0.2, period=2),
  ]
  splits = flat_digits(8, seed=0)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; MLP {SIZES}, "
        f"{len(splits.train.labels)} training examples, {args.epochs} epochs "
        f"of {len(splits.train.labels) // args.batch_size} steps, "
        f"{args.seeds} seed(s)")
  results = []
  for method in methods:
    runs = [run(method, splits, args.epochs, args.batch_size, seed)
            for seed in range(args.seeds)]
    curves = np.array([r["validation_loss"] for r in runs])
    row = dict(method)
    for name in ("test_loss", "test_accuracy", "train_loss", "seconds"):
      row[name], row[name + "_std"] = summary([r[name] for r in runs])
    row["final_validation_loss"], row["final_validation_loss_std"] = summary(
        list(curves[:, -1]))
    row["best_validation_loss"], row["best_validation_loss_std"] = summary(
        list(curves.min(axis=1)))
    row["best_epoch"] = int(np.argmin(curves.mean(axis=0))) + 1
    row["validation_loss_mean"] = curves.mean(axis=0).tolist()
    row["runs"] = runs
    results.append(row)
    print(f"{method['name']}: final validation loss "
          f"{row['final_validation_loss']:.4f}, test accuracy "
          f"{row['test_accuracy']:.4f} ({row['seconds']:.1f} s per run)",
          flush=True)

  print()
  print(f"{'method':<16} {'final val loss':>16} {'best val loss':>16} "
        f"{'best ep':>7} {'test loss':>9} {'test acc':>16} {'train loss':>10}")
  for r in results:
    print(f"{r['name']:<16} "
          f"{r['final_validation_loss']:>8.4f} ±{r['final_validation_loss_std']:<6.4f} "
          f"{r['best_validation_loss']:>8.4f} ±{r['best_validation_loss_std']:<6.4f} "
          f"{r['best_epoch']:>7} {r['test_loss']:>9.4f} "
          f"{r['test_accuracy']:>8.4f} ±{r['test_accuracy_std']:<6.4f} "
          f"{r['train_loss']:>10.5f}")

  if args.plot:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = np.arange(1, args.epochs + 1)
    for r in results:
      ax.plot(epochs, r["validation_loss_mean"], label=r["name"],
              linestyle="-" if r["kind"] == "subgroups" else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.set_title(f"MLP on digits from scratch, mean of {args.seeds} seed(s)")
    ax.legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")
  result = dict(backend=jax.default_backend(), jax_version=jax.__version__,
                quick=args.quick,
                config=vars(args) | dict(json=str(args.json),
                                         plot=str(args.plot)),
                methods=results)
  write_json(result, args.json)
  return result


if __name__ == "__main__":
  main()
