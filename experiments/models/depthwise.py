"""Depthwise convolutions as sums of shifted products, for XLA:CPU.

XLA:CPU runs grouped convolutions with one group per channel (depthwise) on a
slow path: on a 2-core CPU, EfficientNet-Lite0's forward pass on 32 images of
32x32 pixels took about 200 ms and a full train step about 1.3 s, against
16 ms and 200 ms when each depthwise convolution is written as the sum, over
the kernel's k x k taps, of a shifted (strided) slice of the padded input
times that tap's per-channel weights: element-wise work that XLA fuses well,
forwards and backwards. The result is the same convolution up to float
rounding.

:func:`depthwise_as_shifts` applies that rewrite to every depthwise
``flax.linen.Conv`` called inside it, without changing the model's code or
parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def depthwise_conv_by_shifts(
    inputs: jax.Array, kernel: jax.Array, strides: tuple[int, int],
) -> jax.Array:
  """'SAME'-padded depthwise convolution of NHWC ``inputs``.

  Args:
    inputs: shape (batch, height, width, channels).
    kernel: shape (kernel_height, kernel_width, 1, channels), Flax's layout.
    strides: (vertical, horizontal) strides.

  Returns:
    Shape (batch, ceil(height / stride), ceil(width / stride), channels), as
    ``lax.conv_general_dilated(..., padding='SAME',
    feature_group_count=channels)``.
  """
  kernel_height, kernel_width = kernel.shape[:2]
  padding = jax.lax.padtype_to_pads(
      inputs.shape[1:3], (kernel_height, kernel_width), strides, "SAME")
  padded = jnp.pad(inputs, ((0, 0), *padding, (0, 0)))
  batch, height, width, channels = padded.shape
  out_height = (height - kernel_height) // strides[0] + 1
  out_width = (width - kernel_width) // strides[1] + 1
  total = None
  for i in range(kernel_height):
    for j in range(kernel_width):
      window = jax.lax.slice(
          padded, (0, i, j, 0),
          (batch, i + strides[0] * (out_height - 1) + 1,
           j + strides[1] * (out_width - 1) + 1, channels),
          (1, *strides, 1))
      term = window * kernel[i, j, 0]
      total = term if total is None else total + term
  return total


def _is_plain_depthwise(conv: nn.Conv, inputs: Any) -> bool:
  """Whether ``conv`` is a bias-free, 'SAME', undilated depthwise 2-D conv."""
  return (conv.feature_group_count > 1
          and conv.feature_group_count == conv.features
          and getattr(inputs, "ndim", 0) == 4
          and inputs.shape[-1] == conv.features
          and not conv.use_bias and conv.mask is None
          and conv.padding == "SAME"
          and conv.input_dilation in (None, 1, (1, 1))
          and conv.kernel_dilation in (None, 1, (1, 1)))


def _strides(conv: nn.Conv) -> tuple[int, int]:
  if conv.strides is None:
    return (1, 1)
  if isinstance(conv.strides, int):
    return (conv.strides, conv.strides)
  return tuple(conv.strides)


def _shifted_depthwise_interceptor(next_fun, args, kwargs, context):
  conv = context.module
  if (context.method_name != "__call__" or not isinstance(conv, nn.Conv)
      or len(args) != 1 or kwargs or not _is_plain_depthwise(conv, args[0])):
    return next_fun(*args, **kwargs)
  kernel = conv.get_variable("params", "kernel")
  if kernel is None:  # Initialisation: let the module create its kernel.
    return next_fun(*args, **kwargs)
  inputs = args[0]
  return depthwise_conv_by_shifts(
      inputs, kernel.astype(inputs.dtype), _strides(conv))


@contextlib.contextmanager
def depthwise_as_shifts() -> Iterator[None]:
  """Inside it, depthwise ``nn.Conv`` calls run as sums of shifted products.

  Only bias-free, 'SAME'-padded, undilated depthwise convolutions are
  rewritten (those of EfficientNet-Lite); every other module call is left
  alone. It acts at trace time: wrap the ``model.apply`` inside the function
  you jit.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> conv = nn.Conv(8, (3, 3), strides=2, feature_group_count=8,
    ...                use_bias=False)
    >>> x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
    >>> variables = conv.init(jax.random.key(1), x)
    >>> with depthwise_as_shifts():
    ...   shifted = conv.apply(variables, x)
    >>> bool(jnp.allclose(shifted, conv.apply(variables, x), atol=1e-5))
    True
  """
  with nn.intercept_methods(_shifted_depthwise_interceptor):
    yield
