"""Small models and data shared by the tests (plain JAX, no Flax)."""

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (6, 16, 16, 3)


def mlp_params(seed: int = 0, dtype=jnp.float32):
  """A 3-layer MLP; top-level keys in network order, the last one the head."""
  rng = np.random.default_rng(seed)
  names = ("layer0", "layer1", "head")
  params = {}
  for name, (n_in, n_out) in zip(names, zip(SIZES[:-1], SIZES[1:])):
    params[name] = {
        "w": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), dtype),
        "b": jnp.asarray(rng.normal(size=(n_out,)) * 0.1, dtype),
    }
  return params


def mlp_apply(params, x):
  h = x
  for name in ("layer0", "layer1"):
    h = jnp.tanh(h @ params[name]["w"] + params[name]["b"])
  return h @ params["head"]["w"] + params["head"]["b"]


def mlp_loss(params, batch):
  x, y = batch
  logits = mlp_apply(params, x).astype(jnp.float32)
  return -jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(logits), y[:, None], axis=1))


def batches(num: int, batch_size: int = 8, seed: int = 1, dtype=jnp.float32):
  """``num`` distinct minibatches (one per step)."""
  rng = np.random.default_rng(seed)
  return [(jnp.asarray(rng.normal(size=(batch_size, SIZES[0])), dtype),
           jnp.asarray(rng.integers(0, SIZES[-1], size=batch_size), jnp.int32))
          for _ in range(num)]


HEAD_FAST = {"layer0": "slow", "layer1": "slow", "head": "fast"}


def is_fast(path: str) -> bool:
  return path.startswith("head")
