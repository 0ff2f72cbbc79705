"""A convolutional network on the digits with Equinox and Optax.

multirate_optax: the training loop of Equinox's MNIST tutorial (docs/examples/
mnist.ipynb in patrick-kidger/equinox: a small CNN as an eqx.Module whose layers
include plain functions, a loss over jax.vmap(model), AdamW from Optax
initialised on eqx.filter(model, eqx.is_array), and an eqx.filter_jit step),
written here to run offline: scikit-learn's bundled digits, up-sampled to
28x28, instead of the torchvision MNIST download, served by a small loader;
train returns the training time (waiting for the last step: JAX dispatches
asynchronously) and the test accuracy. examples/mnist_equinox_multirate.py is
this file converted to multirate training; `diff` the two to see the
conversion.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sklearn.datasets

BATCH_SIZE = 64
LEARNING_RATE = 3e-4
STEPS = 300
PRINT_EVERY = 30
SEED = 5678


class CNN(eqx.Module):
  layers: list

  def __init__(self, key):
    key1, key2, key3, key4 = jax.random.split(key, 4)
    # Arrays (the layers' weights) and plain functions side by side.
    self.layers = [
        eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
        eqx.nn.MaxPool2d(kernel_size=2),
        jax.nn.relu,
        jnp.ravel,
        eqx.nn.Linear(1728, 512, key=key2),
        jax.nn.sigmoid,
        eqx.nn.Linear(512, 64, key=key3),
        jax.nn.relu,
        eqx.nn.Linear(64, 10, key=key4),
        jax.nn.log_softmax,
    ]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def cross_entropy(y, pred_y):
  # pred_y holds log-probabilities; pick those of the true classes.
  pred_y = jnp.take_along_axis(pred_y, jnp.expand_dims(y, 1), axis=1)
  return -jnp.mean(pred_y)


def loss(model, x, y):
  # The model takes one image: vmap it over the batch.
  pred_y = jax.vmap(model)(x)
  return cross_entropy(y, pred_y)


@eqx.filter_jit
def compute_accuracy(model, x, y):
  pred_y = jnp.argmax(jax.vmap(model)(x), axis=1)
  return jnp.mean(y == pred_y)


def evaluate(model, testloader):
  avg_loss, avg_acc = 0.0, 0.0
  for x, y in testloader:
    avg_loss += eqx.filter_jit(loss)(model, x, y)
    avg_acc += compute_accuracy(model, x, y)
  return avg_loss / len(testloader), avg_acc / len(testloader)


class Loader:
  """Batches of (image, label) pairs, shuffled if asked, like a DataLoader."""

  def __init__(self, images, labels, batch_size, shuffle):
    self.images, self.labels = images, labels
    self.batch_size, self.shuffle = batch_size, shuffle
    self.rng = np.random.default_rng(0)

  def __len__(self):
    return len(self.labels) // self.batch_size

  def __iter__(self):
    n = len(self.labels)
    order = self.rng.permutation(n) if self.shuffle else np.arange(n)
    for i in range(len(self)):
      index = order[i * self.batch_size:(i + 1) * self.batch_size]
      yield self.images[index], self.labels[index]


def get_loaders(batch_size=BATCH_SIZE, train_size=None):
  """The digits' train and test loaders, 1x28x28 images like MNIST."""
  digits = sklearn.datasets.load_digits()
  images = np.asarray(jax.image.resize(
      np.float32(digits.images) / 16.0, (len(digits.images), 28, 28),
      "linear"))[:, None]
  images = (images - 0.1307) / 0.3081  # MNIST's normalisation.
  test = np.random.default_rng(0).permutation(len(images)) < len(images) // 4
  labels = np.int32(digits.target)
  return (Loader(images[~test][:train_size], labels[~test][:train_size],
                 batch_size, shuffle=True),
          Loader(images[test], labels[test], batch_size, shuffle=False))


optim = optax.adamw(LEARNING_RATE)


def train(model, trainloader, testloader, optim, steps, print_every):
  # Only the model's arrays are trained.
  opt_state = optim.init(eqx.filter(model, eqx.is_array))

  @eqx.filter_jit
  def make_step(model, opt_state, x, y):
    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss_value

  def infinite_trainloader():
    while True:
      yield from trainloader

  train_seconds, start = 0.0, time.perf_counter()
  for step, (x, y) in zip(range(steps), infinite_trainloader()):
    model, opt_state, train_loss = make_step(model, opt_state, x, y)
    if (step % print_every) == 0 or (step == steps - 1):
      # Training time up to here, evaluation left out.
      jax.block_until_ready(train_loss)
      train_seconds += time.perf_counter() - start
      test_loss, test_accuracy = evaluate(model, testloader)
      print(f"{step=}, train_loss={train_loss.item():.4f}, "
            f"test_loss={test_loss.item():.4f}, "
            f"test_accuracy={test_accuracy.item():.4f}")
      start = time.perf_counter()
  return model, train_seconds, float(evaluate(model, testloader)[1])


if __name__ == "__main__":
  trainloader, testloader = get_loaders()
  model = CNN(jax.random.key(SEED))
  train(model, trainloader, testloader, optim, STEPS, PRINT_EVERY)
