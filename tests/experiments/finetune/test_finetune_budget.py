"""Budgets: plans, the checkpoint a budget reports, time to target, curves."""

import math

import numpy as np
import pytest

from experiments.finetune.budget import (
    aggregate_curves, at_budget, chosen_index, curve, evaluation_interval,
    improvements, planned_steps, time_to_target)


def points(*rows):
  """Points from ``(seconds, validation, test)``; test ``None`` if untested."""
  return [{"step": 10 * i, "train_seconds": t, "validation_accuracy": v,
           "test_accuracy": a} for i, (t, v, a) in enumerate(rows)]


def test_plans_fill_the_budget_at_the_measured_step_time():
  assert planned_steps(None, None, 120, 8) == 120  # train-all: its epochs
  assert planned_steps(60.0, 0.25, 120, 8) == 240
  assert planned_steps(60.0, 0.01, 120, 8) == 960  # at most 8 train-alls
  assert planned_steps(0.1, 1.0, 120, 8) == 1  # at least one step
  with pytest.raises(ValueError, match="positive step time"):
    planned_steps(60.0, None, 120, 8)


def test_evaluation_points_are_evenly_spaced_over_the_plan():
  for steps, evaluations in [(240, 10), (241, 10), (7, 10), (1, 4)]:
    every = evaluation_interval(steps, evaluations)
    evaluated = {s for s in range(1, steps + 1) if s % every == 0} | {steps}
    assert 1 <= len(evaluated) <= evaluations


def test_a_budget_reports_the_best_validation_checkpoint_within_it():
  run = points((0, .50, .50), (1, .70, .60), (2, .65, .99), (3, .70, .95),
               (4, .80, .70))
  # Test accuracy never matters: point 2 has the best test accuracy and is
  # never chosen; ties on validation keep the earliest (point 1, not 3).
  assert improvements(run) == [0, 1, 4]
  assert [chosen_index(run, b) for b in (0, 0.5, 1, 2.5, 3.9, 4, 100)] == [
      0, 0, 1, 1, 1, 4, 4]
  assert at_budget(run, 3.5) == {"budget_seconds": 3.5, "step": 10,
                                 "train_seconds": 1,
                                 "validation_accuracy": .70,
                                 "test_accuracy": .60, "test_correct": None}
  with pytest.raises(ValueError, match="no evaluation point"):
    chosen_index(points((1, .5, .5)), 0.5)


def test_the_choice_reads_no_test_accuracy():
  """Untested points (no test_accuracy at all) can be chosen among."""
  run = [{"step": i, "train_seconds": i, "validation_accuracy": v}
         for i, v in enumerate((.4, .6, .5))]
  assert chosen_index(run, 10) == 1


def test_time_to_target_and_not_reached():
  run = points((0, .50, .50), (1, .70, .80), (2, .90, .79), (3, .95, .86))
  assert time_to_target(run, .80) == 1
  assert time_to_target(run, .85) == 3
  assert time_to_target(run, .87) is None
  # The reported model, not the best test accuracy seen: after 1 s the
  # reported model changes to one of 79%, so the first time is still 1 s.
  assert time_to_target(run, .795) == 1
  # Accuracies are counts over a split: a target equal to a measured value
  # up to float rounding is reached.
  assert time_to_target(points((0, .5, 0.1 + 0.2)), 0.3) == 0


def test_curves_follow_the_reported_model_and_stop_with_the_run():
  run = points((0, .5, .5), (2, .7, .8), (4, .6, None), (6, .9, .9))
  np.testing.assert_array_equal(
      curve(run, np.array([0, 1, 2, 5, 6, 7])), [.5, .5, .8, .8, .9, np.nan])


def test_curves_aggregate_over_seeds_as_mean_and_band():
  seeds = [points((0, .5, .50), (1, .6, .70), (3, .7, .80)),
           points((0, .5, .40), (2, .6, .60), (4, .7, .90))]
  times = np.array([0.0, 1.0, 2.0, 3.0, 3.5, 4.0])
  bands = aggregate_curves(seeds, times)
  np.testing.assert_allclose(bands["mean"][:4], [.45, .55, .65, .70])
  np.testing.assert_allclose(bands["low"][:4], [.40, .40, .60, .60])
  np.testing.assert_allclose(bands["high"][:4], [.50, .70, .70, .80])
  # Past the shorter run's last point nothing is averaged.
  assert all(math.isnan(bands[k][4]) and math.isnan(bands[k][5])
             for k in bands)
  one = aggregate_curves(seeds[:1], times)
  np.testing.assert_array_equal(one["low"], one["high"])
