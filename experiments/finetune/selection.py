"""Each method's learning rates, selected on validation, and its seeds' runs.

Every method's rate(s) are picked from a small fixed grid by validation
accuracy after one training run per grid point (with the first seed, whose run
with the selected rates is then its reported one); the test split is evaluated
only after selection, on the selected rates' runs, three seeds in ``--full``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import tqdm

from experiments.data import Splits
from experiments.finetune.settings import (
    Method, Rates, Settings, share_updated_every_step)
from experiments.finetune.training import (
    accuracy, fine_tune, fresh_variables, make_loss, make_optimizer,
    make_predict, make_step, warm_up)

PyTree = Any


def rate_candidates(grid: Mapping[str, Sequence[float]]) -> list[Rates]:
  """Every combination of the grid's values, first axis slowest."""
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(
      *(grid[name] for name in names))]


def select_rates(
    candidates: Sequence[Rates], validation_accuracy: Callable[[Rates], float],
) -> tuple[Rates, list[dict[str, Any]]]:
  """The candidate with the best validation accuracy (the first on ties).

  A single candidate is returned without being evaluated.

  Returns:
    The chosen rates, and each candidate's ``{'rates', 'validation_accuracy'}``
    (empty with a single candidate).

  Example:
    >>> select_rates([{'lr': 0.1}, {'lr': 0.3}], lambda r: 1 - abs(r['lr'] - 0.3))
    ({'lr': 0.3}, [{'rates': {'lr': 0.1}, 'validation_accuracy': 0.8}, {'rates': {'lr': 0.3}, 'validation_accuracy': 1.0}])
  """
  if len(candidates) == 1:
    return dict(candidates[0]), []
  scored = [{"rates": dict(rates), "validation_accuracy": validation_accuracy(rates)}
            for rates in candidates]
  best = max(range(len(scored)),
             key=lambda i: (scored[i]["validation_accuracy"], -i))
  return dict(candidates[best]), scored


def format_rates(rates: Rates) -> str:
  """``rates`` in a few characters (``h_F=0.003 h_S=0.005``), for tables,
  progress and the keys of the first seed's runs."""
  short = {"learning_rate": "h", "fast_learning_rate": "h_F",
           "slow_learning_rate": "h_S"}
  return " ".join(f"{short.get(k, k)}={v:g}" for k, v in rates.items())


def runs_of(method: Method, settings: Settings) -> int:
  """Training runs of a method: one per grid point, one per further seed."""
  candidates = len(rate_candidates(settings.grids[method.name]))
  return candidates + len(settings.seeds) - 1


def run_method(method: Method, pretrained: tuple[nn.Module, PyTree],
               splits: Splits, settings: Settings,
               progress: tqdm.tqdm) -> dict[str, Any]:
  """Selects the method's rates on validation, then trains and tests each seed.

  Selection trains the first seed at every grid point and compares validation
  accuracies; the run with the selected rates is that seed's reported run.
  The test split is evaluated only after selection, on the selected runs.
  """
  first_seed = settings.seeds[0]
  model, variables = fresh_variables(pretrained, first_seed,
                                     splits.num_classes)
  share = share_updated_every_step(method, variables["params"])
  steps = settings.epochs * (len(splits.train.labels) // settings.batch_size)
  optimizer = lambda rates: make_optimizer(method, rates, settings, steps)
  candidates = rate_candidates(settings.grids[method.name])
  step = make_step(method, make_loss(model, settings.bn),
                   optimizer(candidates[0]), variables["params"])
  predict = make_predict(model)
  eval_batch_size = 4 * settings.batch_size
  progress.set_postfix_str(f"{method.name}: compiling")
  compile_seconds = warm_up(step, method, optimizer(candidates[0]), variables,
                            splits.train, settings)

  def train(rates: Rates, seed: int) -> tuple[PyTree, float]:
    return fine_tune(step, method, optimizer(rates),
                     fresh_variables(pretrained, seed, splits.num_classes)[1],
                     splits.train, settings, seed, lambda: progress.update(1))

  first_runs = {}  # The first seed's run of each grid point, by its rates.

  def validation_accuracy(rates: Rates) -> float:
    progress.set_postfix_str(f"{method.name}: selecting {format_rates(rates)}")
    first_runs[format_rates(rates)] = train(rates, first_seed)
    return accuracy(predict, first_runs[format_rates(rates)][0],
                    splits.validation, eval_batch_size)

  rates, selection = select_rates(candidates, validation_accuracy)
  runs = []
  for seed in settings.seeds:
    progress.set_postfix_str(f"{method.name}: seed {seed}")
    if seed == first_seed and format_rates(rates) in first_runs:
      trained, seconds = first_runs.pop(format_rates(rates))
    else:
      trained, seconds = train(rates, seed)
    runs.append({"seed": seed, "train_seconds": seconds,
                 "test_accuracy": accuracy(predict, trained, splits.test,
                                           eval_batch_size)})
  return {
      "name": method.name, "label": method.label, "rates": rates,
      "selection": selection, "runs": runs,
      "compile_seconds": compile_seconds,
      "share_updated_every_step": share,
  }
