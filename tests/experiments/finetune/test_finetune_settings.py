"""Which parameters each method trains, on the real network's paths, and the
settings' checks."""

import dataclasses

import jax
import pytest

from experiments.finetune.settings import (
    leaf_paths, leaf_roles, share_updated_every_step)
from experiments.finetune.tasks import TASKS, TEXT
from experiments.finetune.tasks.vision import METHODS, QUICK

BY_NAME = {method.name: method for method in METHODS}


def paths_under(params, *prefixes):
  return {path for path in leaf_paths(params)
          if path.startswith(tuple(p + "/" for p in prefixes))}


@pytest.mark.parametrize("name, every_step, roles", [
    ("train_all", None, ("trained", "frozen")),
    ("multirate_classifier", ("classifier",), ("fast", "slow")),
    ("multirate_classifier_drift", ("classifier",), ("fast", "slow")),
    ("multirate_last_stage", ("blocks_15", "head", "classifier"),
     ("fast", "slow")),
    ("multirate_last_stage_k3", ("blocks_15", "head", "classifier"),
     ("fast", "slow")),
    ("train_last_stage", ("blocks_15", "head", "classifier"),
     ("trained", "frozen")),
    ("train_classifier", ("classifier",), ("trained", "frozen")),
])
def test_method_roles_on_efficientnet_paths(efficientnet_params, name,
                                            every_step, roles):
  all_paths = set(leaf_paths(efficientnet_params))
  expected = (all_paths if every_step is None
              else paths_under(efficientnet_params, *every_step))
  found = leaf_roles(BY_NAME[name], efficientnet_params)
  assert set(found) == all_paths
  assert {p for p, role in found.items() if role == roles[0]} == expected
  assert {p for p, role in found.items() if role == roles[1]} == (
      all_paths - expected)


def test_last_stage_is_the_last_block_with_the_conv_head(efficientnet_params):
  fast = paths_under(efficientnet_params, "blocks_15", "head", "classifier")
  assert fast == {
      *(f"blocks_15/{layer}/{leaf}" for layer in ("expand", "depthwise",
                                                  "project")
        for leaf in ("conv/kernel", "bn/scale", "bn/bias")),
      "head/conv/kernel", "head/bn/scale", "head/bn/bias",
      "classifier/kernel", "classifier/bias"}
  blocks = [int(name.split("_")[1]) for name in efficientnet_params
            if name.startswith("blocks_")]
  assert max(blocks) == 15 and len(blocks) == 16


def test_share_updated_every_step(efficientnet_params):
  sizes = {p: x.size for p, x in zip(leaf_paths(efficientnet_params),
                                     jax.tree.leaves(efficientnet_params))}
  total = sum(sizes.values())
  assert share_updated_every_step(
      BY_NAME["train_classifier"], efficientnet_params) == (
          (1280 * 10 + 10) / total)
  assert share_updated_every_step(
      BY_NAME["train_all"], efficientnet_params) == 1.0


def test_settings_refuse_an_unknown_batch_norm_mode_or_task():
  with pytest.raises(ValueError, match="bn must be 'frozen' or 'train'"):
    dataclasses.replace(QUICK, bn="eval")
  with pytest.raises(ValueError, match="task must be 'vision', 'mnist', 'text' or 'trec'"):
    dataclasses.replace(QUICK, task="audio")


@pytest.mark.parametrize("name, every_step, roles", [
    ("train_all", None, ("trained", "frozen")),
    ("multirate_head", ("classifier",), ("fast", "slow")),
    ("multirate_head_drift", ("classifier",), ("fast", "slow")),
    ("multirate_last_layer", ("layer_5", "classifier"), ("fast", "slow")),
    ("multirate_last_layer_drift", ("layer_5", "classifier"),
     ("fast", "slow")),
    ("train_last_layer", ("layer_5", "classifier"), ("trained", "frozen")),
    ("train_head", ("classifier",), ("trained", "frozen")),
])
def test_text_method_roles_on_minilm_paths(minilm_params, name, every_step,
                                           roles):
  all_paths = set(leaf_paths(minilm_params))
  expected = (all_paths if every_step is None
              else paths_under(minilm_params, *every_step))
  found = leaf_roles(TEXT.method(name), minilm_params)
  assert {p for p, role in found.items() if role == roles[0]} == expected
  assert {p for p, role in found.items() if role == roles[1]} == (
      all_paths - expected)
  assert "layer_5/attention/query/kernel" in paths_under(minilm_params,
                                                         "layer_5")


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_every_task_lists_train_all_first_and_a_grid_per_method(task):
  assert task.methods[0].train_all
  assert sum(method.train_all for method in task.methods) == 1
  for settings in (task.quick, task.full):
    assert settings.task == task.name
    for method in task.methods:
      assert set(settings.grids[method.name]) == set(method.rate_names)
    assert settings.methods is None or "train_all" in settings.methods
  assert task.quick.quick and not task.full.quick
  assert len(task.full.seeds) == 3


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_budget_fraction_outside_0_1_is_refused(fraction):
  with pytest.raises(ValueError, match="budget_fraction of 'x' must be in"):
    dataclasses.replace(METHODS[0], name="x", budget_fraction=fraction)


def test_train_all_planned_for_half_the_time_is_not_the_baseline():
  halves = [m for m in TEXT.methods if m.budget_fraction < 1]
  assert {m.name for m in halves} == {
      "train_all_half", "multirate_head_half",
      "multirate_last_layer_drift_half"}
  assert [m.name for m in TEXT.methods if m.train_all] == ["train_all"]


def test_an_unknown_clock_is_refused():
  with pytest.raises(ValueError, match="clock must be 'wall' or 'process'"):
    dataclasses.replace(QUICK, clock="gpu")
