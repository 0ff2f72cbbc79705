"""What a split of the parameters saves: XLA's estimates and measured times."""

from multirate_optax.profiling._cost import CostEstimate, estimate_saving
from multirate_optax.profiling._splits import (
    PhaseProfile, predicted_speedup, profile_splits, SplitProfile,
    SplitsProfile)

__all__ = (
    "CostEstimate",
    "estimate_saving",
    "PhaseProfile",
    "predicted_speedup",
    "profile_splits",
    "SplitProfile",
    "SplitsProfile",
)
