"""Length bucketing of the text task: the same texts per batch, the same
logits, loss and training as padding every batch to the maximum (the
unbucketed path is the reference), and one program per bucket and phase,
all compiled in the warm-up."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks.budget_sweep as budget_sweep
from experiments.data import LengthBuckets
from experiments.finetune.__main__ import parse_args
from experiments.finetune.tasks import TEXT, VISION
from experiments.finetune.training import (
    Examples, Plan, accuracy, batches, make_step, train_and_evaluate,
    train_buckets, warm_up)
from experiments.models import MiniLM
from conftest import TINY_MINILM
from _probes import count_compilations
import multirate_optax as mo

TINY_BUCKETS = LengthBuckets.multiples(4, 12)  # 4, 8, 12


@pytest.fixture(scope="module")
def mixed_examples():
  """48 texts of 1 to 12 tokens (many short), label 1 when token 7 appears."""
  rng = np.random.default_rng(1)
  lengths = rng.choice([1, 2, 3, 4, 5, 7, 8, 10, 12], size=48)
  ids = rng.integers(8, 64, size=(48, 12)).astype(np.int32)
  mask = (np.arange(12) < lengths[:, None]).astype(np.int32)
  labels = np.arange(48) % 2
  ids[labels == 1, 0] = 7
  return Examples(np.stack([ids * mask, mask], axis=1),
                  labels.astype(np.int32))


def undropped_pretrained():
  """The tiny encoder without encoder dropout: the classifier's dropout on
  the pooled features (of one shape at every length) is all that is left."""
  encoder = MiniLM(dataclasses.replace(TINY_MINILM, dropout_rate=0.0))
  ids = jnp.ones((1, 12), jnp.int32)
  return encoder, encoder.init(jax.random.key(0), ids, ids)


def test_a_bucketed_batch_has_the_logits_loss_and_gradient_of_the_padded_one(
    mixed_examples, tiny_settings):
  settings = tiny_settings(TEXT, max_length=12)
  model, variables = TEXT.fresh_variables(undropped_pretrained(), 0, 2)
  inputs, labels = mixed_examples
  for length in (4, 8, 12):
    chosen = LengthBuckets.text_lengths(inputs) <= length
    batch, batch_labels = inputs[chosen][:8], labels[chosen][:8]
    cut = TINY_BUCKETS.trim(batch)
    assert cut.shape[-1] == length
    logits = lambda x: model.apply(variables, x[:, 0], x[:, 1])
    np.testing.assert_allclose(logits(cut), logits(batch), rtol=1e-5,
                               atol=1e-6)
    loss = TEXT.make_loss(model, settings)  # Dropout on (classifier only).
    value_and_grad = jax.value_and_grad(
        lambda p, x: loss(p, {}, x, batch_labels, jax.random.key(3),
                          np.int32(5))[0])
    (value, grads), (padded_value, padded_grads) = (
        value_and_grad(variables["params"], x) for x in (cut, batch))
    np.testing.assert_allclose(value, padded_value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-6), grads, padded_grads)


def test_bucketed_batches_hold_the_same_texts_in_the_same_order(
    mixed_examples):
  for batch_size, seed in ((2, 0), (4, 3), (16, 1)):
    bucketed = list(batches(mixed_examples, batch_size, seed, 40,
                            TINY_BUCKETS))
    padded = list(batches(mixed_examples, batch_size, seed, 40))
    assert len(bucketed) == len(padded) == 40
    for (inputs, labels), (whole, whole_labels) in zip(bucketed, padded):
      np.testing.assert_array_equal(labels, whole_labels)
      length = inputs.shape[-1]
      assert length in TINY_BUCKETS.lengths
      np.testing.assert_array_equal(inputs, whole[..., :length])
      assert not whole[..., length:].any()  # Only padding was cut,
      longest = LengthBuckets.text_lengths(whole).max()
      assert length == min(n for n in (4, 8, 12) if n >= longest)  # tightly.
    if batch_size == 2:
      assert {x.shape[-1] for x, _ in bucketed} == {4, 8, 12}


def test_rotten_tomatoes_batches_are_the_unbucketed_ones_cut():
  settings = dataclasses.replace(TEXT.quick, split_sizes=(200, 50, 50))
  train = TEXT.load_splits(settings).train
  buckets = TEXT.length_buckets(settings)
  assert buckets.lengths == (8, 16, 24, 32, 40, 48)
  for (inputs, labels), (whole, whole_labels) in zip(
      batches(train, 32, 0, 12, buckets), batches(train, 32, 0, 12)):
    np.testing.assert_array_equal(labels, whole_labels)
    np.testing.assert_array_equal(inputs, whole[..., :inputs.shape[-1]])
    assert not whole[..., inputs.shape[-1]:].any()
  # Evaluation shortest first: batches of short texts are cut.
  lengths = np.sort(LengthBuckets.text_lengths(train.inputs))
  assert buckets.length_for(lengths[:32].max()) < 48


def test_bucketed_training_and_evaluation_equal_the_padded_ones(
    mixed_examples, tiny_settings):
  """A whole run without encoder dropout: same accuracies at every point
  and the same final parameters, to float rounding."""
  settings = tiny_settings(TEXT, max_length=12)
  pretrained = undropped_pretrained()
  method = TEXT.method("multirate_head")
  model, variables = TEXT.fresh_variables(pretrained, 0, 2)
  optimizer = TEXT.make_optimizer(
      method, {"head_learning_rate": 1e-2, "slow_learning_rate": 1e-2},
      settings, 30)
  step = make_step(method, TEXT.make_loss(model, settings), optimizer,
                   variables["params"])
  predict = TEXT.make_predict(model)
  train, validation = Examples(*(x[:32] for x in mixed_examples)), Examples(
      *(x[32:] for x in mixed_examples))
  runs = []
  for buckets in (TINY_BUCKETS, None):
    validate = lambda v: accuracy(predict, v, validation, 8, buckets=buckets)
    runs.append(train_and_evaluate(
        step, method, optimizer, TEXT.fresh_variables(pretrained, 0, 2)[1],
        train, Plan(30, 10), 2, 0, validate, buckets=buckets))
  bucketed, padded = runs
  assert [p["validation_accuracy"] for p in bucketed.points] == [
      p["validation_accuracy"] for p in padded.points]
  # The attention's key biases have a gradient of exactly 0 (a query adds
  # q . b to every key's score; the softmax ignores it): AdamW turns the
  # rounding left there into steps of up to the rate, on either path, and
  # they change no output. Every other parameter agrees to rounding.
  unused = lambda path: "key/bias" in path
  bucketed_leaves, padded_leaves = (
      {mo.path_str(path): leaf for path, leaf in
       jax.tree_util.tree_flatten_with_path(run.variables)[0]}
      for run in (bucketed, padded))
  assert sum(map(unused, padded_leaves)) == 2  # One per layer.
  for path, leaf in padded_leaves.items():
    if not unused(path):
      np.testing.assert_allclose(bucketed_leaves[path], leaf, rtol=1e-4,
                                 atol=1e-6, err_msg=path)
  logits = lambda run: model.apply(run.variables, validation.inputs[:, 0],
                                   validation.inputs[:, 1])
  np.testing.assert_allclose(logits(bucketed), logits(padded), rtol=1e-4,
                             atol=1e-6)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       padded.variables["params"],
                       jax.device_get(variables["params"]))
  assert moved["classifier"]["kernel"] and moved["layer_0"]["output"]["kernel"]


@pytest.mark.parametrize("name,phases", [("train_all", 1),
                                         ("multirate_head", 2)])
def test_one_program_per_bucket_and_phase_all_compiled_in_the_warm_up(
    mixed_examples, tiny_text_pretrained, tiny_settings, name, phases):
  settings = tiny_settings(TEXT, max_length=12)
  method = TEXT.method(name)
  model, variables = TEXT.fresh_variables(tiny_text_pretrained, 0, 2)
  optimizer = TEXT.make_optimizer(method, {r: 1e-2 for r in method.rate_names},
                                  settings, 40)
  traced = []  # One trace of the loss per compiled program: its length.
  loss = TEXT.make_loss(model, settings)

  def traced_loss(params, state, inputs, *args):
    traced.append(inputs.shape[-1])
    return loss(params, state, inputs, *args)

  step = make_step(method, traced_loss, optimizer, variables["params"])
  warm_up(step, method, optimizer, variables, mixed_examples, 2,
          probe_steps=2, buckets=TINY_BUCKETS)
  assert sorted(traced) == sorted([4, 8, 12] * phases)
  with count_compilations() as compilations:
    run = train_and_evaluate(
        step, method, optimizer,
        TEXT.fresh_variables(tiny_text_pretrained, 1, 2)[1], mixed_examples,
        Plan(40, 40), 2, 1, buckets=TINY_BUCKETS)
  assert run.train_seconds > 0
  assert compilations[0] == 0 and len(traced) == 3 * phases


def test_train_buckets_are_those_the_seeds_batches_use(mixed_examples):
  used = train_buckets(TINY_BUCKETS, mixed_examples, 16, (0, 1, 2), 30)
  assert used.lengths == (12,)  # 16 texts: the longest is nearly always 12.
  longest = [LengthBuckets.text_lengths(x).max()
             for seed in (0, 1) for x, _ in batches(mixed_examples, 2, seed, 30)]
  shares = {n: np.mean([TINY_BUCKETS.length_for(m) == n for m in longest])
            for n in (4, 8, 12)}
  used = train_buckets(TINY_BUCKETS, mixed_examples, 2, (0, 1), 30)
  assert used.lengths == tuple(n for n in (4, 8, 12)
                               if n == 12 or shares[n] >= 0.05)
  assert used.lengths == (4, 8, 12)


def test_the_flag_turns_bucketing_off(monkeypatch):
  _, settings, *_ = parse_args(["--task", "text"])
  assert settings.bucketing
  assert TEXT.length_buckets(settings).lengths == (8, 16, 24, 32, 40, 48)
  _, settings, *_ = parse_args(["--task", "text", "--max-length", "20"])
  assert TEXT.length_buckets(settings).lengths == (8, 16, 20)
  _, settings, *_ = parse_args(["--task", "text", "--no-bucketing"])
  assert not settings.bucketing and TEXT.length_buckets(settings) is None
  assert "no bucketing" in TEXT.describe(settings)
  assert VISION.length_buckets(VISION.quick) is None

  class Stop(Exception):
    pass

  def stop(task, settings, **kwargs):
    raise Stop(settings)

  monkeypatch.setattr(budget_sweep, "run_experiment", stop)
  for argv, expected in (([], True), (["--no-bucketing"], False)):
    with pytest.raises(Stop) as stopped:
      budget_sweep.main(["--task", "text", "--quick",
                         "--no-compilation-cache", *argv])
    assert stopped.value.args[0].bucketing is expected
