"""The text task on a tiny randomly initialised encoder of MiniLM's layout."""

import json
from pathlib import Path

import jax
import numpy as np

from experiments.finetune.settings import leaf_paths, leaf_roles
from experiments.finetune.tasks import TEXT
from experiments.finetune.training import Plan, make_step, train_and_evaluate


def test_fresh_variables_copy_the_encoder_under_a_new_head(
    tiny_text_pretrained):
  encoder, variables = tiny_text_pretrained
  model, fresh = TEXT.fresh_variables(tiny_text_pretrained, 3, 4)
  assert model.num_classes == 4 and model.config == encoder.config
  assert list(fresh["params"])[-1] == "classifier"
  assert fresh["params"]["classifier"]["kernel"].shape == (8, 4)
  same = jax.tree.map(np.array_equal, fresh["params"]["layer_0"],
                      dict(variables["params"])["layer_0"])
  assert all(jax.tree.leaves(same))
  again = TEXT.fresh_variables(tiny_text_pretrained, 3, 4)[1]
  np.testing.assert_array_equal(again["params"]["classifier"]["kernel"],
                                fresh["params"]["classifier"]["kernel"])


def rates_in(state):
  """Every RatesState's rates in an optimizer state, in order."""
  found = []
  for leaf in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "rates")):
    if hasattr(leaf, "rates"):
      found.append({k: (float(np.float32(v)) if hasattr(v, "__float__")
                        else v) for k, v in leaf.rates.items()})
  return found


def test_multirate_puts_adamw_inside_with_a_rate_per_group(
    tiny_text_pretrained, tiny_settings, minilm_params):
  settings = tiny_settings(TEXT)
  _, variables = TEXT.fresh_variables(tiny_text_pretrained, 0, 2)
  params = variables["params"]
  method = TEXT.method("multirate_head_drift")
  rates = {"encoder_learning_rate": 1e-4, "head_learning_rate": 3e-3,
           "slow_learning_rate": 2.5e-4}
  state = TEXT.make_optimizer(method, rates, settings, 10).init(params)
  roles = leaf_roles(method, params)
  assert state.labels == tuple(roles[p] for p in leaf_paths(params))
  assert state.timetable.period == settings.period
  f32 = lambda x: float(np.float32(x))
  assert rates_in(state) == [{"head_learning_rate": f32(3e-3)},
                             {"slow_learning_rate": f32(2.5e-4)}]
  # The last layer is fast at the encoder rate, the head at its own.
  method = TEXT.method("multirate_last_layer_drift")
  state = jax.eval_shape(TEXT.make_optimizer(method, rates, settings, 10).init,
                         minilm_params)
  assert state.labels == tuple(
      leaf_roles(method, minilm_params)[p] for p in leaf_paths(minilm_params))
  assert [set(r) for r in rates_in(state)] == [
      {"encoder_learning_rate", "head_learning_rate"}, {"slow_learning_rate"}]
  plain = TEXT.method("train_all")
  state = TEXT.make_optimizer(plain, rates, settings, 10).init(params)
  assert rates_in(state) == [
      {"encoder_learning_rate": f32(1e-4), "head_learning_rate": f32(3e-3)}]


def test_a_multirate_run_moves_the_slow_encoder_on_slow_steps_only(
    tiny_text_pretrained, tiny_text_splits, tiny_settings):
  settings = tiny_settings(TEXT)
  model, variables = TEXT.fresh_variables(tiny_text_pretrained, 0, 2)
  before = jax.device_get(variables["params"])
  method = TEXT.method("multirate_head")
  rates = {"head_learning_rate": 1e-2, "slow_learning_rate": 1e-2}
  optimizer = TEXT.make_optimizer(method, rates, settings, 3)
  step = make_step(method, TEXT.make_loss(model, settings), optimizer,
                   variables["params"])
  moved = []
  for steps in (1, 2):  # t = 0 is a slow step, t = 1 a fast one (k = 2).
    _, fresh = TEXT.fresh_variables(tiny_text_pretrained, 0, 2)
    run = train_and_evaluate(step, method, optimizer, fresh,
                             tiny_text_splits.train, Plan(steps, steps), 16,
                             0)
    moved.append(jax.device_get(run.variables["params"]))
  changed = lambda a, b: not np.array_equal(a["layer_0"]["output"]["kernel"],
                                            b["layer_0"]["output"]["kernel"])
  assert changed(moved[0], before)  # The slow step moved the encoder,
  assert not changed(moved[1], moved[0])  # the fast step did not,
  assert not np.array_equal(moved[1]["classifier"]["kernel"],
                            moved[0]["classifier"]["kernel"])  # but the head.


def test_a_whole_text_run(tiny_text_run, tiny_text_splits):
  settings, report, (json_path, png_path) = tiny_text_run
  assert report["task"] == "text" and report["model"] == "all-MiniLM-L6-v2"
  names = [method["name"] for method in report["methods"]]
  assert names == list(settings.methods)
  # Bucketed (12 tokens: buckets 8 and 12); batches of 16 need 12.
  assert settings.bucketing and report["settings"]["bucketing"]
  for method in report["methods"]:
    assert method["train_bucket_lengths"] == (12,)
  budget = report["methods"][0]["runs"][0]["train_seconds"]
  for method in report["methods"][1:]:
    share = 0.5 if method["name"].endswith("_half") else 1.0
    assert method["runs"][0]["budget_seconds"] == budget * share
  half = report["methods"][-1]["runs"][0]
  # Stopped at its plan's end or at the first point past half the budget.
  assert sum(p["train_seconds"] >= budget / 2 for p in half["points"]) <= 1
  saved = json.loads(Path(json_path).read_text())
  assert saved["split_sizes"] == {"train": 48, "validation": 16, "test": 16}
  assert {t["target"] for t in saved["targets"]} == {
      "at T/2, multirate >= every other method",
      "multirate within 1.0 point of train-all at <= 0.55 T",
      "multirate more accurate than head-only at equal time"}
  assert Path(png_path).name == "finetune_text.png"
  assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
