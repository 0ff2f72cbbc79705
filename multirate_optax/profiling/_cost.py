"""What a timetable saves, estimated from XLA's cost analysis of its programs."""

from __future__ import annotations

from typing import Any, NamedTuple

from multirate_optax.core._timetable import find_timetable_state
from multirate_optax.core._train_step import TrainStep

PyTree = Any


class CostEstimate(NamedTuple):
  """A timetable's compute, from XLA's cost analysis of each phase's program.

  Attributes:
    phase_flops: the floating-point operations of one step of each phase
      (0 for a phase the run does not reach).
    steps_per_phase: how many steps of the run each phase has.
    saving: ``1 - sum(steps * flops) / (total steps * flops of phase 0)``, the
      share of the work of training every step as in phase 0 that is saved.

  Example:
    Multirate with ``period=4``: a quarter of the steps train everything,
    the others the head alone.

    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones((16, 16)), 'head': jnp.ones((16, 1))}
    >>> def loss_fn(params, x):
    ...   return jnp.sum(jnp.tanh(x @ params['body']) @ params['head'])
    >>> tx = mo.multirate(optax.sgd(0.1), labels=mo.fast_by_path('head'), period=4)
    >>> step = mo.train_step(loss_fn, tx, dispatch='host')
    >>> estimate = mo.estimate_saving(step, params, tx.init(params),
    ...                               jnp.ones((8, 16)), total_steps=100)
    >>> estimate.steps_per_phase, estimate.phase_flops[1] < estimate.phase_flops[0]
    ((25, 75), True)
    >>> work = sum(n * f for n, f in zip(estimate.steps_per_phase, estimate.phase_flops))
    >>> bool(abs(estimate.saving - (1 - work / (100 * estimate.phase_flops[0]))) < 1e-12)
    True
  """

  phase_flops: tuple[float, ...]
  steps_per_phase: tuple[int, ...]
  saving: float


def estimate_saving(step: TrainStep, params: PyTree, opt_state: PyTree, *args,
                    total_steps: int | None = None) -> CostEstimate:
  """Estimates the compute a timetable saves, from the compiled programs.

  Compiles the program of every phase met in the first ``total_steps`` steps
  (``'host'`` dispatch compiles these same programs) and weighs the flops
  XLA's cost analysis counts for each by its number of steps. Phase 0, where
  the timetable starts, is the reference: for FreezeOut it trains every layer.

  Args:
    step: the train step.
    params, opt_state, args: as for a call of ``step`` (only shapes and
      dtypes matter).
    total_steps: the length of the run; by default the timetable's own
      ``total_steps`` (a :class:`FreezeOutTimetable` has one).

  Returns:
    A :class:`CostEstimate`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones((64, 64)), 'head': jnp.ones((64, 1))}
    >>> def loss_fn(params, x):
    ...   return jnp.sum(jnp.tanh(x @ params['body']) @ params['head'])
    >>> timetable = mo.FreezeOutTimetable(num_layers=2, total_steps=100)
    >>> tx = mo.freezeout(optax.sgd(0.1), timetable,
    ...                   layers={'body': 0, 'head': 1})
    >>> step = mo.train_step(loss_fn, tx, dispatch='host')
    >>> estimate = mo.estimate_saving(step, params, tx.init(params),
    ...                               jnp.ones((32, 64)))
    >>> estimate.steps_per_phase  # body frozen from step ceil(0.8**3 * 100)
    (52, 48, 0)
    >>> 0.2 < estimate.saving < 0.5
    True
  """
  timetable = find_timetable_state(opt_state).timetable
  if total_steps is None:
    total_steps = getattr(timetable, "total_steps", None)
    if total_steps is None:
      raise ValueError(
          f"total_steps is needed for a {type(timetable).__name__}, which does "
          "not know the length of the run.")
  counts = [0] * len(timetable.phases)
  for t in range(total_steps):
    counts[timetable.phase(t)] += 1
  flops = tuple(
      float(step.program(params, opt_state, *args, phase=p).compile()
            .cost_analysis()["flops"]) if n or p == 0 else 0.0
      for p, n in enumerate(counts))
  work = sum(n * f for n, f in zip(counts, flops))
  return CostEstimate(flops, tuple(counts), 1.0 - work / (total_steps * flops[0]))

