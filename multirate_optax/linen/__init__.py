"""Multirate training of Flax Linen models: a train state and its train step.

:class:`TrainState` is Flax's ``flax.training.train_state.TrainState`` with an
optional ``batch_stats`` collection; :func:`train_step` advances it (or
Flax's own ``TrainState``), computing only the gradients the current phase
uses. It wraps the core :class:`multirate_optax.TrainStep`, so the phase
choice, the restricted backward pass and both dispatch modes are the core's.

BatchNorm on fast steps: the forward pass runs in full on every step, so every
BatchNorm layer, slow ones included, normalises with the batch's statistics
and updates its running statistics on every step. Only the gradients are
restricted: a slow layer's scale and bias do not change on fast steps, but its
running mean and variance keep tracking the activations that the moving fast
(and, with drift, slow) parameters produce, which is what evaluation needs.
"""

from multirate_optax.linen._train_step import (
    train_step, TrainState, TrainStep)

__all__ = (
    "train_step",
    "TrainState",
    "TrainStep",
)
