"""A stand-in for EfficientNet-Lite0 with its top-level names and call, a few
hundred weights: the fine-tuning and budgeted-transfer tests train it in
seconds."""

import flax.linen as nn

from experiments.models import HEAD_FEATURES


class ConvBatchNorm(nn.Module):
  features: int
  depthwise: bool = False

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3),
                feature_group_count=self.features if self.depthwise else 1,
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     name="bn")(x)
    return nn.relu(x)


class TinyNet(nn.Module):
  """EfficientNetLite0's top-level names and call, a few hundred weights."""
  num_classes: int = 1000
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, images, train=False, deterministic=None):
    deterministic = not train if deterministic is None else deterministic
    x = ConvBatchNorm(4, name="stem")(images, train)
    x = ConvBatchNorm(4, depthwise=True, name="blocks_14")(x, train)
    x = ConvBatchNorm(4, name="blocks_15")(x, train)
    x = nn.Conv(HEAD_FEATURES, (1, 1), use_bias=False, name="head")(x)
    x = nn.Dropout(self.dropout_rate)(x.mean((1, 2)),
                                      deterministic=deterministic)
    return nn.Dense(self.num_classes, name="classifier")(x)
