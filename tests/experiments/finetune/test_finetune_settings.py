"""Which parameters each method trains, on the real network's paths, and the
settings' checks."""

import dataclasses

import jax
import pytest

from experiments.finetune.settings import (
    METHODS, QUICK, leaf_paths, leaf_roles, share_updated_every_step)

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


def test_settings_refuse_an_unknown_batch_norm_mode():
  with pytest.raises(ValueError, match="bn must be 'frozen' or 'train'"):
    dataclasses.replace(QUICK, bn="eval")
