"""Time budgets: each run's plan, the checkpoint a budget allows, time to target.

The protocol (both tasks):

* Train-all trains ``settings.epochs`` epochs; its training time ``T`` on a
  seed is the budget of every method on that seed.
* Every other method plans as many steps as fit in ``T`` at its own speed
  (:func:`planned_steps`: ``T`` over its step time measured after compilation,
  at most ``max_epochs_factor`` train-alls' epochs, :func:`step_cap`), and its
  learning rates decay over that planned run. At each evaluation point before
  the plan's end the run re-plans from its measured speed so far
  (:func:`experiments.finetune.training.replanned_steps`), the decay
  stretching or shrinking with the plan. It stops at its plan's end, or at
  the first evaluation point at or past ``T``.
* Every run is evaluated on the validation split at ``settings.evaluations``
  evenly spaced points of its plan (:func:`evaluation_interval`) and before
  its first step. The training clock stops for evaluation.
* The model reported at a budget ``b`` is the checkpoint with the best
  validation accuracy among those reached within ``b`` seconds of training,
  the earliest on ties (:func:`chosen_index`): what a user who keeps the best
  model so far has at ``b``. Only those best-so-far checkpoints are ever
  evaluated on the test split, after training (:func:`improvements`).
* Time to target: the training time after which the reported model first
  reaches a test accuracy (:func:`time_to_target`); the target is train-all's
  accuracy at ``T`` minus 0.5 points. ``None``: not reached in the run (which
  ends near ``T``).

Points are dicts with ``train_seconds`` and ``validation_accuracy``, and
``test_accuracy`` on the best-so-far ones once tested, with ``test_correct``:
which test examples the checkpoint classified correctly (:func:`pack_correct`),
so that two methods can be compared example by example on the shared split.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

Point = Mapping[str, Any]
# Budgets are compared with this relative slack, so that a point measured at
# exactly the budget counts as within it despite float rounding.
_SLACK = 1e-9


def planned_steps(budget: Optional[float], step_seconds: Optional[float],
                  epoch_steps: int, max_epochs_factor: float) -> int:
  """Steps a run plans: ``epoch_steps`` without a budget, else as many as fit.

  Args:
    budget: training seconds allowed (train-all's time); ``None`` for
      train-all itself, which plans ``epoch_steps``.
    step_seconds: the method's mean step time, measured after compilation.
    epoch_steps: train-all's steps (its epochs times the steps per epoch).
    max_epochs_factor: at most this many times ``epoch_steps``.

  Example:
    >>> planned_steps(None, 0.5, 100, 8), planned_steps(30.0, 0.1, 100, 8)
    (100, 300)
    >>> planned_steps(30.0, 0.01, 100, 8)  # capped
    800
  """
  if budget is None:
    return epoch_steps
  if step_seconds is None or not step_seconds > 0:
    raise ValueError(
        f"a budget needs a positive step time, got {step_seconds!r}.")
  return max(1, min(step_cap(epoch_steps, max_epochs_factor),
                    int(budget / step_seconds)))


def step_cap(epoch_steps: int, max_epochs_factor: float) -> int:
  """The most steps a run may plan or re-plan: ``max_epochs_factor``
  train-alls.

  Example:
    >>> step_cap(120, 8), step_cap(3, 0.1)
    (960, 1)
  """
  return max(1, int(max_epochs_factor * epoch_steps))


def evaluation_interval(steps: int, evaluations: int) -> int:
  """Steps between evaluation points: ``evaluations`` points over ``steps``.

  The last step is always evaluated too, so a run that completes its plan has
  between 1 and ``evaluations`` points after its first step.

  Example:
    >>> evaluation_interval(36, 6), evaluation_interval(37, 6), evaluation_interval(3, 6)
    (6, 7, 1)
  """
  return max(1, math.ceil(steps / evaluations))


def improvements(points: Sequence[Point]) -> list[int]:
  """Indices of the points whose validation accuracy beats every earlier one.

  The first point always counts; ties do not (the earliest is kept). These are
  the only checkpoints any budget can choose, so the only ones tested.

  Example:
    >>> improvements([{'validation_accuracy': a} for a in (.5, .7, .7, .6, .8)])
    [0, 1, 4]
  """
  best, indices = -math.inf, []
  for index, point in enumerate(points):
    if point["validation_accuracy"] > best:
      best = point["validation_accuracy"]
      indices.append(index)
  return indices


def chosen_index(points: Sequence[Point], budget: float) -> int:
  """The checkpoint reported at ``budget`` training seconds.

  The best validation accuracy among the points within the budget, the
  earliest on ties; test accuracies are not read.

  Raises:
    ValueError: no point lies within the budget.

  Example:
    >>> points = [{'train_seconds': t, 'validation_accuracy': a}
    ...           for t, a in ((0, .5), (1, .8), (2, .8), (3, .9))]
    >>> chosen_index(points, 2.5), chosen_index(points, 3)
    (1, 3)
  """
  within = [i for i in improvements(points)
            if points[i]["train_seconds"] <= budget * (1 + _SLACK)]
  if not within:
    raise ValueError(f"no evaluation point within {budget} s of training.")
  return within[-1]


def at_budget(points: Sequence[Point], budget: float) -> dict[str, Any]:
  """The reported checkpoint at ``budget``: its step, time and accuracies
  (and ``test_correct``, ``None`` in records made before it was kept)."""
  point = points[chosen_index(points, budget)]
  return {"budget_seconds": budget, "step": point["step"],
          "train_seconds": point["train_seconds"],
          "validation_accuracy": point["validation_accuracy"],
          "test_accuracy": point["test_accuracy"],
          "test_correct": point.get("test_correct")}


def pack_correct(hits: np.ndarray) -> str:
  """Per-example booleans as a short JSON-safe string (base64 of the bits).

  Example:
    >>> hits = np.array([True, False, True, True, False])
    >>> pack_correct(hits)
    'sA=='
    >>> unpack_correct(pack_correct(hits), 5).tolist()
    [True, False, True, True, False]
  """
  return base64.b64encode(np.packbits(np.asarray(hits, bool))).decode("ascii")


def unpack_correct(packed: str, size: int) -> np.ndarray:
  """The ``size`` booleans :func:`pack_correct` packed."""
  bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), np.uint8))
  if len(bits) < size or bits[size:].any():
    raise ValueError(f"a record of {len(bits)} bits does not hold {size} "
                     "examples: it was made on another test split.")
  return bits[:size].astype(bool)


def time_to_target(points: Sequence[Point], target: float) -> Optional[float]:
  """Training seconds after which the reported model first has ``target`` test
  accuracy; ``None`` if it never does within the run.

  The reported model changes only at best-so-far points, so the answer is the
  time of one of them.

  Example:
    >>> points = [{'train_seconds': t, 'validation_accuracy': v, 'test_accuracy': a}
    ...           for t, v, a in ((0, .5, .5), (1, .8, .7), (2, .7, None), (3, .9, .85))]
    >>> time_to_target(points, .8), time_to_target(points, .9)
    (3, None)
  """
  for index in improvements(points):
    if points[index]["test_accuracy"] >= target - _SLACK:
      return points[index]["train_seconds"]
  return None


def curve(points: Sequence[Point], times: np.ndarray) -> np.ndarray:
  """Test accuracy of the reported model at each of ``times``; NaN after the
  run's last point (where the run says nothing)."""
  last = points[-1]["train_seconds"]
  return np.array([points[chosen_index(points, t)]["test_accuracy"]
                   if t <= last * (1 + _SLACK) else np.nan for t in times])


def aggregate_curves(runs: Sequence[Sequence[Point]], times: np.ndarray,
                     ) -> dict[str, np.ndarray]:
  """Mean, minimum and maximum over runs (seeds) of their :func:`curve`.

  Defined (not NaN) only at times every run reaches, so that the mean is over
  the same seeds everywhere.

  Example:
    >>> run = lambda *ats: [{'step': i, 'train_seconds': t, 'validation_accuracy': a,
    ...                      'test_accuracy': a} for i, (t, a) in enumerate(ats)]
    >>> bands = aggregate_curves([run((0, .5), (2, .7)), run((0, .3), (1, .9))],
    ...                          np.array([0.0, 1.0, 2.0]))
    >>> [[round(float(x), 2) for x in bands[k]] for k in ('mean', 'low', 'high')]
    [[0.4, 0.7, nan], [0.3, 0.5, nan], [0.5, 0.9, nan]]
  """
  values = np.stack([curve(points, times) for points in runs])
  defined = ~np.isnan(values).any(axis=0)
  result = {}
  for name, reduce in (("mean", np.mean), ("low", np.min), ("high", np.max)):
    result[name] = np.where(defined, reduce(np.where(defined, values, 0.0),
                                            axis=0), np.nan)
  return result
