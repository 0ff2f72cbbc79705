"""What a split of the parameters saves: estimates from XLA's cost analysis."""

from multirate_optax.profiling._cost import CostEstimate, estimate_saving

__all__ = (
    "CostEstimate",
    "estimate_saving",
)
