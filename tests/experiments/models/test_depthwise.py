"""Depthwise convolutions as sums of shifted products (the experiments' CPU path)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models.depthwise import (
    depthwise_as_shifts, depthwise_conv_by_shifts)


def lax_depthwise(inputs, kernel, stride):
  return jax.lax.conv_general_dilated(
      inputs, kernel, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=inputs.shape[-1])


@pytest.mark.parametrize("size, kernel_size, stride",
                         [(7, 3, 1), (8, 3, 2), (7, 5, 2), (8, 5, 1)])
def test_values_and_gradients_equal_lax_convolution(size, kernel_size, stride):
  keys = jax.random.split(jax.random.key(size * kernel_size + stride), 3)
  inputs = jax.random.normal(keys[0], (2, size, size, 6))
  kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, 1, 6))
  cotangent = jax.random.normal(
      keys[2], lax_depthwise(inputs, kernel, stride).shape)

  def weighted(conv):
    return jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(conv(x, w) * cotangent), argnums=(0, 1)))

  expected = weighted(lambda x, w: lax_depthwise(x, w, stride))(inputs, kernel)
  found = weighted(lambda x, w: depthwise_conv_by_shifts(
      x, w, (stride, stride)))(inputs, kernel)
  for e, f in zip(jax.tree.leaves(expected), jax.tree.leaves(found)):
    np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-4)


def primitives(fn, *args):
  return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_only_depthwise_convolutions_are_rewritten():
  depthwise = nn.Conv(6, (3, 3), strides=2, feature_group_count=6,
                      use_bias=False)
  ordinary = nn.Conv(6, (3, 3), use_bias=False)
  inputs = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  for conv, rewritten in ((depthwise, True), (ordinary, False)):
    variables = conv.init(jax.random.key(1), inputs)

    def shifted(v, x, conv=conv):
      with depthwise_as_shifts():
        return conv.apply(v, x)

    assert ("conv_general_dilated" not in primitives(
        shifted, variables, inputs)) == rewritten
    np.testing.assert_allclose(shifted(variables, inputs),
                               conv.apply(variables, inputs), atol=1e-5)


def test_interception_ends_with_the_context():
  conv = nn.Conv(6, (3, 3), feature_group_count=6, use_bias=False)
  inputs = jnp.ones((1, 5, 5, 6))
  variables = conv.init(jax.random.key(0), inputs)
  with depthwise_as_shifts():
    pass
  assert "conv_general_dilated" in primitives(conv.apply, variables, inputs)
