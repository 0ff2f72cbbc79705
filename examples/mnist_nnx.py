# Copyright 2024 The Flax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""MNIST example.

Library file which executes the training and evaluation loop for MNIST.
The data is loaded using tensorflow_datasets.

multirate_optax: Flax's NNX MNIST example (google/flax, examples/mnist/
train.py as of commit 0ef9abb2), changed only to run offline here:
scikit-learn's bundled digits, up-sampled to 28x28, instead of the MNIST
download (get_datasets serves them like the tf.data pipeline it replaces), no
TensorBoard writer or SavedModel export, the configuration (configs/
default.py) inlined as get_config, and the training time (waiting for the
epoch's last step: JAX dispatches asynchronously) and test accuracy returned.
examples/mnist_nnx_multirate.py is this file converted to multirate training;
`diff` the two to see the conversion.
"""

# See issue #620.
# pytype: disable=wrong-keyword-args
from functools import partial
import time
import types

from absl import logging
from flax import nnx
import jax
import numpy as np
import optax
import sklearn.datasets


class CNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    x = self.linear2(x)
    return x



def loss_fn(model: CNN, batch, rngs):
  logits = model(batch['image'], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits=logits, labels=batch['label']
  ).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch, rngs):
  """Train for a single step."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch, rngs)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
  optimizer.update(model, grads)  # In-place updates.




@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch, None)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.


class Batches:
  """Shuffled (for training) batches of a split, like a batched tf.data set."""

  def __init__(self, split, batch_size, shuffle):
    self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
    self.rng = np.random.default_rng(0)

  def as_numpy_iterator(self):
    n = len(self.split['label'])
    order = self.rng.permutation(n) if self.shuffle else np.arange(n)
    for start in range(0, n - self.batch_size + 1, self.batch_size):
      index = order[start:start + self.batch_size]
      yield {key: value[index] for key, value in self.split.items()}


def get_datasets(config):
  """Load the digits' train and test batches, 28x28 like MNIST."""
  digits = sklearn.datasets.load_digits()
  images = np.asarray(jax.image.resize(
      np.float32(digits.images) / 16.0, (len(digits.images), 28, 28),
      'linear'))[..., None]
  test = np.random.default_rng(0).permutation(len(images)) < len(images) // 4
  train = {'image': images[~test][:config.train_size],
           'label': np.int32(digits.target[~test][:config.train_size])}
  test = {'image': images[test], 'label': np.int32(digits.target[test])}
  return (Batches(train, config.batch_size, shuffle=True),
          Batches(test, config.batch_size, shuffle=False))


def train_and_evaluate(config, workdir: str) -> None:
  """Execute model training and evaluation loop.

  Args:
    config: Hyperparameter configuration for training and evaluation.
    workdir: Directory path to store metrics.
  """
  train_ds, test_ds = get_datasets(config)

  # Instantiate the model.
  model = CNN(rngs=nnx.Rngs(0))

  learning_rate = config.learning_rate
  momentum = config.momentum

  optimizer = nnx.Optimizer(
      model, optax.sgd(learning_rate, momentum), wrt=nnx.Param
  )
  metrics = nnx.MultiMetric(
      accuracy=nnx.metrics.Accuracy(),
      loss=nnx.metrics.Average('loss'),
  )
  rngs = nnx.Rngs(0)
  train_seconds = 0.0

  for epoch in range(1, config.num_epochs + 1):
    # Run the optimization for one step and make a stateful update to the
    # following:
    # - The train state's model parameters
    # - The optimizer state
    # - The training loss and accuracy batch metrics
    model.train()  # Switch to train mode

    start = time.perf_counter()
    for batch in train_ds.as_numpy_iterator():
      train_step(model, optimizer, metrics, batch, rngs)
    #  Compute the training metrics.
    train_metrics = metrics.compute()
    jax.block_until_ready((train_metrics, nnx.state(model)))
    train_seconds += time.perf_counter() - start
    metrics.reset()  # Reset the metrics for the test set.

    # Compute the metrics on the test set after each training epoch.
    model.eval()  # Switch to eval mode
    for batch in test_ds.as_numpy_iterator():
      eval_step(model, metrics, batch)

    # Compute the eval metrics.
    eval_metrics = metrics.compute()
    metrics.reset()  # Reset the metrics for the next training epoch.

    logging.info(  # pylint: disable=logging-not-lazy
        'epoch:% 3d, train_loss: %.4f, train_accuracy: %.2f, test_loss: %.4f,'
        ' test_accuracy: %.2f'
        % (
            epoch,
            train_metrics['loss'],
            train_metrics['accuracy'] * 100,
            eval_metrics['loss'],
            eval_metrics['accuracy'] * 100,
        )
    )

  return model, train_seconds, float(eval_metrics['accuracy'])


def get_config():
  """Get the default hyperparameter configuration."""
  config = types.SimpleNamespace()

  config.learning_rate = 0.1
  config.momentum = 0.9
  config.batch_size = 128
  config.num_epochs = 10
  config.train_size = None  # All 1,348 training digits.
  return config


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  train_and_evaluate(get_config(), workdir='')
