"""Growing networks (Yuan et al., 2023): width growth with variance transfer.

* :mod:`~multirate_optax.growth._plan`: when the network grows, to which
  widths.
* :mod:`~multirate_optax.growth._widths`: the function-preserving growth of a
  params tree, old weights rescaled.
* :mod:`~multirate_optax.growth._optimizer_state`: the optimizer state of a
  grown network.
* :mod:`~multirate_optax.growth._stage_rates`: learning rates per growth
  stage.
"""

from multirate_optax.growth._optimizer_state import grow_optimizer_state
from multirate_optax.growth._plan import GrowthPlan, growth_plan
from multirate_optax.growth._stage_rates import (
    scale_by_stage_norms, stage_norm_factors)
from multirate_optax.growth._widths import (
    Growth, Layer, describe_widths, element_stages, grow)

__all__ = (
    "describe_widths",
    "element_stages",
    "grow",
    "grow_optimizer_state",
    "Growth",
    "growth_plan",
    "GrowthPlan",
    "Layer",
    "scale_by_stage_norms",
    "stage_norm_factors",
)
