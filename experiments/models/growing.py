"""Networks that grow in width, with the description of their stack.

Each model takes its widths as attributes, so the same module class builds the
network of every growth stage, and says which of its layers read and write
which width (:func:`mlp_layers`, :func:`resnet_layers`) for
:func:`multirate_optax.grow`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

import multirate_optax as mo


class GrowingMLP(nn.Module):
  """Dense layers with ReLU, hidden widths ``hidden{i}``, then a classifier."""

  hidden: tuple[int, ...]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No BatchNorm or dropout.
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def mlp_layers(num_hidden: int) -> tuple[mo.Layer, ...]:
  """The stack of :class:`GrowingMLP`: widths ``input``, ``hidden{i}``, ``classes``."""
  names = ["input"] + [f"hidden{i}" for i in range(num_hidden)] + ["classes"]
  modules = [f"dense{i}" for i in range(num_hidden)] + ["head"]
  return tuple(mo.Layer(kernel=f"{m}/kernel", bias=f"{m}/bias", reads=r,
                        writes=w)
               for m, r, w in zip(modules, names[:-1], names[1:]))


class GrowingResNet(nn.Module):
  """A ResNet-style CNN: stem, residual blocks, average pooling, classifier.

  The residual stream has width ``stream`` (written by the stem and by the
  second convolution of every block, read by each block's first convolution
  and by the classifier); block ``i``'s inner width is ``block{i}``. Each
  convolution is followed by a BatchNorm; the stream is average-pooled by 2
  after every block but the last.
  """

  stream: int
  hidden: tuple[int, ...]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False)
    x = nn.relu(norm(name="stem_norm")(conv(self.stream, name="stem")(x)))
    for i, width in enumerate(self.hidden):
      h = nn.relu(norm(name=f"block{i}_norm1")(
          conv(width, name=f"block{i}_conv1")(x)))
      h = norm(name=f"block{i}_norm2")(conv(self.stream, name=f"block{i}_conv2")(h))
      x = nn.relu(x + h)
      if i + 1 < len(self.hidden):
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def resnet_layers(num_blocks: int) -> tuple[mo.Layer, ...]:
  """The stack of :class:`GrowingResNet`: widths ``rgb``, ``stream``, ``block{i}``, ``classes``."""
  layers = [mo.Layer(kernel="stem/kernel", reads="rgb", writes="stream",
                     norm="stem_norm")]
  for i in range(num_blocks):
    layers += [
        mo.Layer(kernel=f"block{i}_conv1/kernel", reads="stream",
                 writes=f"block{i}", norm=f"block{i}_norm1"),
        mo.Layer(kernel=f"block{i}_conv2/kernel", reads=f"block{i}",
                 writes="stream", norm=f"block{i}_norm2"),
    ]
  layers.append(mo.Layer(kernel="head/kernel", bias="head/bias",
                         reads="stream", writes="classes"))
  return tuple(layers)
