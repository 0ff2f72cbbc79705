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

"""ImageNet example.

This script trains a ResNet-50 on the ImageNet dataset.
The data is loaded using tensorflow_datasets.

multirate_optax: examples/imagenet_linen.py (Flax's ImageNet example, run
offline on the digits with a narrow ResNet18) converted to multirate training:
the Dense head is fast, the convolutions and BatchNorm scales slow, updated
once per cycle of 5 steps (spread over it: drift); on the other steps no
gradient is computed for them. Everything else is the example's: its
TrainState subclass, jax.pmap over the 'batch' axis with BatchNorm's
axis_name, the warm-up + cosine schedule, compute_metrics with lax.pmean,
sync_batch_stats (cross_replica_mean) before evaluation. What changed (`diff
examples/imagenet_linen.py examples/imagenet_linen_multirate.py`):
  - import multirate_optax as mo;
  - train_step: loss_fn takes the batch statistics as an argument and returns
    the new ones (not the whole model state); mo.linen.train_step(loss_fn,
    has_aux=True, dispatch='cond', axis_name='batch').apply(state) replaces
    the gradient code, the lax.pmean of the gradients, apply_gradients and
    both dynamic-scale branches: the library step averages the gradients
    (and the new batch statistics) over the pmap axis and honours
    state.dynamic_scale as the example does (scaled loss, a non-finite step
    skipped with params and optimizer state kept, the scale adapted,
    fin_steps counted); metrics['scale'] reads the new state's scale;
  - the optimizer: the example's optax.sgd(schedule, momentum, nesterov=True)
    inside mo.multirate, its defaults unchanged: the slow part's schedule
    follows the global step, as the fast part's.
'cond' dispatch, since under jax.pmap the host cannot pick one program per
call (the library refuses 'host' there). On CPU that makes this step slower
than the example's (XLA:CPU runs convolution weight gradients inside a
conditional on a slow path; measured in docs/guides/flax.md): there, drop
pmap for jax.jit on a Mesh, where the default 'host' dispatch applies.
"""

import functools
import time
import types
from typing import Any
from collections.abc import Callable, Sequence

from absl import logging
from flax import jax_utils
from flax import linen as nn
from flax.training import common_utils
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
from jax import random
import numpy as np
import optax
import sklearn.datasets

import multirate_optax as mo


NUM_CLASSES = 10

ModuleDef = Any


class ResNetBlock(nn.Module):
  """ResNet block."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(
      self,
      x,
  ):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)

    if residual.shape != y.shape:
      residual = self.conv(
          self.filters, (1, 1), self.strides, name='conv_proj'
      )(residual)
      residual = self.norm(name='norm_proj')(residual)

    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNetV1.5."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        axis_name='batch',
    )

    x = conv(
        self.num_filters,
        (7, 7),
        (2, 2),
        padding=[(3, 3), (3, 3)],
        name='conv_init',
    )(x)
    x = norm(name='bn_init')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
            self.num_filters * 2**i,
            strides=strides,
            conv=conv,
            norm=norm,
            act=self.act,
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    x = jnp.asarray(x, self.dtype)
    return x


ResNet18 = functools.partial(
    ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock
)


# Used for testing only.
_ResNet1 = functools.partial(ResNet, stage_sizes=[1], block_cls=ResNetBlock)


def create_model(*, model_cls, half_precision, **kwargs):
  platform = jax.local_devices()[0].platform
  if half_precision:
    if platform == 'tpu':
      model_dtype = jnp.bfloat16
    else:
      model_dtype = jnp.float16
  else:
    model_dtype = jnp.float32
  return model_cls(num_classes=NUM_CLASSES, dtype=model_dtype, **kwargs)


def initialized(key, image_size, model):
  input_shape = (1, image_size, image_size, 3)

  @jax.jit
  def init(*args):
    return model.init(*args)

  variables = init({'params': key}, jnp.ones(input_shape, model.dtype))
  return variables['params'], variables['batch_stats']


def cross_entropy_loss(logits, labels):
  one_hot_labels = common_utils.onehot(labels, num_classes=NUM_CLASSES)
  xentropy = optax.softmax_cross_entropy(logits=logits, labels=one_hot_labels)
  return jnp.mean(xentropy)


def compute_metrics(logits, labels):
  loss = cross_entropy_loss(logits, labels)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics = {
      'loss': loss,
      'accuracy': accuracy,
  }
  metrics = lax.pmean(metrics, axis_name='batch')
  return metrics


def create_learning_rate_fn(
    config,
    base_learning_rate: float,
    steps_per_epoch: int,
):
  """Create learning rate schedule."""
  warmup_fn = optax.linear_schedule(
      init_value=0.0,
      end_value=base_learning_rate,
      transition_steps=config.warmup_epochs * steps_per_epoch,
  )
  cosine_epochs = max(config.num_epochs - config.warmup_epochs, 1)
  cosine_fn = optax.cosine_decay_schedule(
      init_value=base_learning_rate, decay_steps=cosine_epochs * steps_per_epoch
  )
  schedule_fn = optax.join_schedules(
      schedules=[warmup_fn, cosine_fn],
      boundaries=[config.warmup_epochs * steps_per_epoch],
  )
  return schedule_fn


def train_step(state, batch, learning_rate_fn):
  """Perform a single training step."""

  def loss_fn(params, batch_stats):
    """loss function used for training."""
    logits, new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats},
        batch['image'],
        mutable=['batch_stats'],
    )
    loss = cross_entropy_loss(logits, batch['label'])
    weight_penalty_params = jax.tree_util.tree_leaves(params)
    weight_decay = 0.0001
    weight_l2 = sum(
        jnp.sum(x**2) for x in weight_penalty_params if x.ndim > 1
    )
    weight_penalty = weight_decay * 0.5 * weight_l2
    loss = loss + weight_penalty
    return loss, (new_model_state['batch_stats'], logits)

  step = state.step
  dynamic_scale = state.dynamic_scale
  lr = learning_rate_fn(step)

  new_state, (_, logits) = mo.linen.train_step(
      loss_fn, has_aux=True, dispatch='cond', axis_name='batch').apply(state)
  metrics = compute_metrics(logits, batch['label'])
  metrics['learning_rate'] = lr

  if dynamic_scale:
    metrics['scale'] = new_state.dynamic_scale.scale

  return new_state, metrics


def eval_step(state, batch):
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, batch['image'], train=False, mutable=False)
  return compute_metrics(logits, batch['label'])


def prepare_tf_data(xs):
  """Lay a host batch out per local device, as the example does."""
  local_device_count = jax.local_device_count()

  def _prepare(x):
    # reshape (host_batch_size, height, width, 3) to
    # (local_devices, device_batch_size, height, width, 3)
    return x.reshape((local_device_count, -1) + x.shape[1:])

  return jax.tree_util.tree_map(_prepare, xs)


def get_datasets(config, image_size):
  """The digits' train and test splits, image_size x image_size x 3."""
  digits = sklearn.datasets.load_digits()
  images = jax.image.resize(
      np.float32(digits.images) / 16.0,
      (len(digits.images), image_size, image_size), 'linear')
  images = np.repeat(np.asarray(images)[..., None], 3, axis=-1)
  test = np.random.default_rng(0).permutation(len(images)) < len(images) // 4
  train_ds = {'image': images[~test][:config.train_size],
              'label': np.int32(digits.target[~test][:config.train_size])}
  test_ds = {'image': images[test], 'label': np.int32(digits.target[test])}
  return train_ds, test_ds


def create_input_iter(ds, batch_size, dtype, train, seed=0):
  """Batches of ds, reshuffled each epoch when train, without end."""
  rng = np.random.default_rng(seed)
  num_batches = len(ds['label']) // batch_size
  while True:
    order = (rng.permutation(len(ds['label'])) if train
             else np.arange(len(ds['label'])))
    for i in range(num_batches):
      index = order[i * batch_size:(i + 1) * batch_size]
      yield prepare_tf_data({'image': ds['image'][index].astype(dtype),
                             'label': ds['label'][index]})


class TrainState(train_state.TrainState):
  batch_stats: Any
  dynamic_scale: dynamic_scale_lib.DynamicScale


# pmean only works inside pmap because it needs an axis name.
# This function will average the inputs across all devices.
cross_replica_mean = jax.pmap(lambda x: lax.pmean(x, 'x'), 'x')


def sync_batch_stats(state):
  """Sync the batch statistics across replicas."""
  # Each device has its own version of the running average batch statistics and
  # we sync them before evaluation.
  return state.replace(batch_stats=cross_replica_mean(state.batch_stats))


def create_train_state(
    rng, config, model, image_size, learning_rate_fn
):
  """Create initial training state."""
  dynamic_scale = None
  platform = jax.local_devices()[0].platform
  if config.half_precision and platform == 'gpu':
    dynamic_scale = dynamic_scale_lib.DynamicScale()
  else:
    dynamic_scale = None

  params, batch_stats = initialized(rng, image_size, model)
  tx = mo.multirate(optax.sgd(
      learning_rate=learning_rate_fn,
      momentum=config.momentum,
      nesterov=True,
  ), labels=mo.fast_by_path('Dense'), period=5)
  state = TrainState.create(
      apply_fn=model.apply,
      params=params,
      tx=tx,
      batch_stats=batch_stats,
      dynamic_scale=dynamic_scale,
  )
  return state


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Execute model training and evaluation loop.

  Args:
    config: Hyperparameter configuration for training and evaluation.
    workdir: Directory where the tensorboard summaries are written to.

  Returns:
    The final TrainState (replicated over the local devices), the seconds
    spent in train steps (evaluation excluded) and the last test accuracy.
  """
  del workdir  # No summaries or checkpoints are written here.

  rng = random.key(0)

  image_size = 32

  if config.batch_size % jax.device_count() > 0:
    raise ValueError('Batch size must be divisible by the number of devices')
  local_batch_size = config.batch_size // jax.process_count()

  platform = jax.local_devices()[0].platform

  if config.half_precision:
    if platform == 'tpu':
      input_dtype = jnp.bfloat16
    else:
      input_dtype = jnp.float16
  else:
    input_dtype = jnp.float32

  train_ds, test_ds = get_datasets(config, image_size)
  train_iter = create_input_iter(
      train_ds, local_batch_size, input_dtype, train=True
  )
  eval_iter = create_input_iter(
      test_ds, local_batch_size, input_dtype, train=False
  )

  steps_per_epoch = len(train_ds['label']) // config.batch_size

  if config.num_train_steps <= 0:
    num_steps = int(steps_per_epoch * config.num_epochs)
  else:
    num_steps = config.num_train_steps

  if config.steps_per_eval == -1:
    num_validation_examples = len(test_ds['label'])
    steps_per_eval = num_validation_examples // config.batch_size
  else:
    steps_per_eval = config.steps_per_eval

  base_learning_rate = config.learning_rate * config.batch_size / 256.0

  model_cls = globals()[config.model]
  model = create_model(
      model_cls=model_cls, half_precision=config.half_precision,
      num_filters=config.num_filters,
  )

  learning_rate_fn = create_learning_rate_fn(
      config, base_learning_rate, steps_per_epoch
  )

  state = create_train_state(rng, config, model, image_size, learning_rate_fn)
  step_offset = int(state.step)
  state = jax_utils.replicate(state)

  p_train_step = jax.pmap(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn),
      axis_name='batch',
  )
  p_eval_step = jax.pmap(eval_step, axis_name='batch')

  train_metrics = []
  train_seconds = 0.0
  test_accuracy = float('nan')
  logging.info('Initial compilation, this might take some minutes...')
  for step, batch in zip(range(step_offset, num_steps), train_iter):
    start = time.perf_counter()
    state, metrics = p_train_step(state, batch)
    jax.block_until_ready(state)
    train_seconds += time.perf_counter() - start
    if step == step_offset:
      logging.info('Initial compilation completed.')

    if config.log_every_steps:
      train_metrics.append(metrics)
      if (step + 1) % config.log_every_steps == 0:
        train_metrics = common_utils.get_metrics(train_metrics)
        summary = {
            f'train_{k}': v
            for k, v in jax.tree_util.tree_map(
                lambda x: x.mean(), train_metrics
            ).items()
        }
        logging.info('step: %d, %s', step + 1, summary)
        train_metrics = []

    if (step + 1) % steps_per_epoch == 0 or step + 1 == num_steps:
      epoch = step // steps_per_epoch
      eval_metrics = []

      # sync batch statistics across replicas
      state = sync_batch_stats(state)
      for _ in range(steps_per_eval):
        eval_batch = next(eval_iter)
        metrics = p_eval_step(state, eval_batch)
        eval_metrics.append(metrics)
      eval_metrics = common_utils.get_metrics(eval_metrics)
      summary = jax.tree_util.tree_map(lambda x: x.mean(), eval_metrics)
      logging.info(
          'eval epoch: %d, loss: %.4f, accuracy: %.2f',
          epoch,
          summary['loss'],
          summary['accuracy'] * 100,
      )
      test_accuracy = float(summary['accuracy'])

  # Wait until computations are done before exiting
  jax.random.normal(jax.random.key(0), ()).block_until_ready()

  return state, train_seconds, test_accuracy


def get_config():
  """Get the default hyperparameter configuration."""
  config = types.SimpleNamespace()

  # As defined above (Flax's models module).
  config.model = 'ResNet18'
  config.num_filters = 16

  config.learning_rate = 0.1
  config.warmup_epochs = 1.0
  config.momentum = 0.9
  config.batch_size = 64

  config.num_epochs = 10.0
  config.log_every_steps = 10

  config.half_precision = False

  # If num_train_steps==-1 then the number of training steps is calculated from
  # num_epochs using the entire dataset. Similarly for steps_per_eval.
  config.num_train_steps = -1
  config.steps_per_eval = -1
  config.train_size = None  # All 1,348 training digits.
  return config


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  train_and_evaluate(get_config(), workdir='')
