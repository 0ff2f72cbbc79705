"""EfficientNet-Lite0 as a Flax Linen module (NHWC), equal to the PyTorch port.

The network is the one built by ``efficientnet-lite-pytorch``'s
``EfficientNet.from_name('efficientnet-lite0')`` (Tan & Le, 2019, with the Lite
changes: ReLU6 instead of swish, no squeeze-and-excitation, stem and head
widths not scaled): TensorFlow-style 'SAME' padding, BatchNorm with epsilon
1e-3 and momentum 0.99 (PyTorch's 0.01), stochastic depth ("drop connect") on
the residual blocks and dropout before the classifier.

The parameters are laid out, in network order, as::

  stem/{conv, bn}                              3x3 stride-2 conv to 32 channels
  blocks_0 ... blocks_15/{expand, depthwise, project}/{conv, bn}
  head/{conv, bn}                              1x1 conv to 1280 channels
  classifier/{kernel, bias}                    the final Dense layer

One ``blocks_i`` per MBConv block (``blocks_0`` has no ``expand``, its expand
ratio being 1). ``BLOCKS[i].stage`` tells the stage of ``blocks_i``, and
:func:`stage_block_names` turns a stage into module names for labelling, e.g.
``stage_block_names(-1) == ('blocks_15',)`` for the last stage.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

STEM_FEATURES = 32
HEAD_FEATURES = 1280
IMAGENET_CLASSES = 1000

# PyTorch's BatchNorm momentum 0.01 weighs the new batch; Flax's weighs the old
# running average, hence 1 - 0.01.
_BATCH_NORM_MOMENTUM = 0.99
_BATCH_NORM_EPSILON = 1e-3


class BlockConfig(NamedTuple):
  """One MBConv block of the network.

  Attributes:
    stage: index of the stage (group of blocks with the same settings) the
      block belongs to, 0 to 6.
    kernel_size: side of the depthwise convolution's kernel.
    stride: stride of the depthwise convolution.
    expand_ratio: hidden channels over input channels.
    input_features: channels in.
    output_features: channels out.
  """
  stage: int
  kernel_size: int
  stride: int
  expand_ratio: int
  input_features: int
  output_features: int


# (repeats, kernel size, stride, expand ratio, channels in, channels out) of
# each stage, from the Lite0 block strings 'r1_k3_s11_e1_i32_o16', ...
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _blocks_of_stages() -> tuple[BlockConfig, ...]:
  blocks = []
  for stage, (repeats, kernel, stride, expand, features_in, features_out) in (
      enumerate(_STAGES)):
    # Only a stage's first block changes resolution and width.
    blocks.append(BlockConfig(stage, kernel, stride, expand, features_in,
                              features_out))
    blocks.extend(BlockConfig(stage, kernel, 1, expand, features_out,
                              features_out) for _ in range(repeats - 1))
  return tuple(blocks)


BLOCKS: tuple[BlockConfig, ...] = _blocks_of_stages()
NUM_STAGES = len(_STAGES)


def stage_block_names(stage: int) -> tuple[str, ...]:
  """Names of the top-level modules (``blocks_i``) that make up a stage.

  Args:
    stage: stage index, 0 to 6; negative values count from the end, so -1 is
      the last stage.

  Returns:
    The names, in network order.

  Example:
    >>> from experiments.models import stage_block_names
    >>> stage_block_names(-1)
    ('blocks_15',)
    >>> stage_block_names(5)
    ('blocks_11', 'blocks_12', 'blocks_13', 'blocks_14')
  """
  if not -NUM_STAGES <= stage < NUM_STAGES:
    raise ValueError(
        f"stage must be in [-{NUM_STAGES}, {NUM_STAGES - 1}], got {stage}.")
  stage %= NUM_STAGES
  return tuple(f"blocks_{i}" for i, block in enumerate(BLOCKS)
               if block.stage == stage)


def _classifier(num_classes: int) -> nn.Dense:
  # Shared by the module and replace_classifier, so that a fresh head is
  # initialised exactly like the module's own.
  return nn.Dense(num_classes)


class _ConvBatchNorm(nn.Module):
  """Convolution without bias, BatchNorm, then ReLU6 if ``activation``.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    stride: stride of the convolution.
    depthwise: one filter per input channel (``feature_group_count`` equal to
      the channels) instead of a full convolution.
    activation: whether ReLU6 follows the BatchNorm.
  """
  features: int
  kernel_size: int
  stride: int = 1
  depthwise: bool = False
  activation: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size),
        strides=self.stride,
        # Flax's 'SAME' pads like TensorFlow (the extra pixel at the end),
        # which is what the PyTorch port's static padding does at 224 pixels
        # and at any side that is a multiple of 32.
        padding="SAME",
        feature_group_count=self.features if self.depthwise else 1,
        use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=_BATCH_NORM_MOMENTUM,
                     epsilon=_BATCH_NORM_EPSILON, name="bn")(x)
    return nn.relu6(x) if self.activation else x


class _MBConvBlock(nn.Module):
  """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project.

  Attributes:
    config: the block's shape.
    drop_connect_rate: probability of dropping the residual branch of a whole
      example (stochastic depth) when not deterministic.
  """
  config: BlockConfig
  drop_connect_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool,
               deterministic: bool) -> jax.Array:
    config = self.config
    hidden = config.input_features * config.expand_ratio
    x = inputs
    if config.expand_ratio != 1:
      x = _ConvBatchNorm(hidden, 1, name="expand")(x, train)
    x = _ConvBatchNorm(hidden, config.kernel_size, config.stride,
                       depthwise=True, name="depthwise")(x, train)
    x = _ConvBatchNorm(config.output_features, 1, activation=False,
                       name="project")(x, train)
    if config.stride == 1 and config.input_features == config.output_features:
      # One keep/drop draw per example, rescaled by 1/keep like PyTorch's.
      x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(
          x, deterministic=deterministic)
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 classifier on NHWC images.

  Attributes:
    num_classes: outputs of the classifier.
    dropout_rate: dropout on the pooled features, before the classifier.
    drop_connect_rate: stochastic depth: block ``i`` drops its residual
      branch for an example with probability ``drop_connect_rate * i / 16``,
      as in the PyTorch port.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments.models import EfficientNetLite0
    >>> model = EfficientNetLite0(num_classes=10)
    >>> images = jnp.zeros((8, 32, 32, 3))
    >>> # Shapes only here: model.init(key, images) takes seconds to compile on
    >>> # CPU; load_pretrained_efficientnet_lite0 gives trained variables.
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)
    >>> variables['params']['classifier']['kernel'].shape
    (1280, 10)
    >>> # Inference: BatchNorm running averages, no dropout.
    >>> jax.eval_shape(model.apply, variables, images).shape
    (8, 10)
    >>> # Fine-tuning with BatchNorm frozen: running averages, dropout on.
    >>> frozen_bn = lambda v, x, key: model.apply(
    ...     v, x, train=False, deterministic=False, rngs={'dropout': key})
    >>> jax.eval_shape(frozen_bn, variables, images, jax.random.key(1)).shape
    (8, 10)
    >>> # Training BatchNorm too: batch statistics, running averages updated.
    >>> train_bn = lambda v, x, key: model.apply(
    ...     v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    >>> logits, updates = jax.eval_shape(train_bn, variables, images,
    ...                                  jax.random.key(1))
    >>> sorted(updates)
    ['batch_stats']
  """
  num_classes: int = IMAGENET_CLASSES
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2

  def setup(self):
    self.stem = _ConvBatchNorm(STEM_FEATURES, 3, 2)
    self.blocks = [
        _MBConvBlock(config, self.drop_connect_rate * i / len(BLOCKS))
        for i, config in enumerate(BLOCKS)]
    self.head = _ConvBatchNorm(HEAD_FEATURES, 1)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.classifier = _classifier(self.num_classes)

  def __call__(self, images: jax.Array, train: bool = False,
               deterministic: bool | None = None) -> jax.Array:
    """Class logits of a batch of images.

    Args:
      images: float array of shape (batch, height, width, 3), normalised with
        the ImageNet mean and standard deviation.
      train: BatchNorm uses the batch's statistics and updates its running
        averages (pass ``mutable=['batch_stats']``; the running variance
        moves towards the biased batch variance, where PyTorch uses the
        unbiased one); when False it uses the running averages, i.e.
        BatchNorm is frozen in inference mode.
      deterministic: turns dropout and stochastic depth off; defaults to
        ``not train``. When False, ``apply`` needs ``rngs={'dropout': key}``.

    Returns:
      Logits of shape (batch, num_classes).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          "EfficientNetLite0 expects NHWC images of shape (batch, height, "
          f"width, 3), got shape {images.shape}.")
    if deterministic is None:
      deterministic = not train
    x = self.stem(images, train)
    for block in self.blocks:
      x = block(x, train, deterministic)
    x = self.head(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = self.dropout(x, deterministic=deterministic)
    return self.classifier(x)


def replace_classifier(
    model: EfficientNetLite0, variables: dict[str, Any], num_classes: int,
    rng: jax.Array,
) -> tuple[EfficientNetLite0, dict[str, Any]]:
  """A fresh ``num_classes``-way classifier on a (pretrained) backbone.

  Args:
    model: the model whose classifier is replaced (its other settings are kept).
    variables: the model's variables, ``{'params': ..., 'batch_stats': ...}``.
    num_classes: outputs of the new classifier.
    rng: key for the new classifier's initialisation (Flax's Dense default:
      LeCun-normal kernel, zero bias).

  Returns:
    ``(model, variables)``: a copy of ``model`` with ``num_classes`` outputs,
    and the variables with only ``params['classifier']`` replaced (it stays
    the last top-level entry).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments.models import EfficientNetLite0, replace_classifier
    >>> model = EfficientNetLite0()
    >>> variables = jax.eval_shape(  # stands for pretrained variables
    ...     model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> model, variables = replace_classifier(model, variables, 10,
    ...                                       jax.random.key(1))
    >>> model.num_classes, variables['params']['classifier']['kernel'].shape
    (10, (1280, 10))
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
      num_classes < 1):
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}.")
  params = variables.get("params", {})
  if "classifier" not in params:
    raise ValueError(
        "variables['params'] has no 'classifier' entry; expected the variables"
        f" of EfficientNetLite0, found top-level params {list(params)}.")
  classifier = _classifier(num_classes).init(
      rng, jnp.zeros((1, HEAD_FEATURES), jnp.float32))["params"]
  new_params = {name: (classifier if name == "classifier" else value)
                for name, value in params.items()}
  return (model.clone(num_classes=num_classes),
          {**variables, "params": new_params})
