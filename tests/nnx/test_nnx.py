"""Multirate training of NNX modules: trajectories, restricted backward pass, BatchNorm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import multirate_optax as mo
from _models import batches, is_fast, mlp_loss, mlp_params
from _probes import count_compilations, count_host_reads, hlo_op_count
from _reference import multirate_sgd
from _steps import H, MU, NAMES, NNXHarness, NNXMLP, cross_entropy, nnx_loss

HEAD = nnx.PathContains("head")
MLP = NNXMLP


def multirate_tx(period, drift=False):
  return NNXHarness(period, drift=drift).tx


class BatchNormNet(nnx.Module):
  """Dense -> BatchNorm -> tanh -> dropout -> head; dropout key per call."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.layer0 = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.8, rngs=rngs)
    self.dropout = nnx.Dropout(0.3)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, key):
    return self.head(self.dropout(jnp.tanh(self.norm(self.layer0(x))), rngs=key))


def test_batch_norm_and_dropout_on_fast_steps():
  period = 3
  data = [(x, y, jax.random.key(t)) for t, (x, y) in enumerate(batches(12))]

  def loss_fn(model, batch):
    x, y, key = batch
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(model(x, key)), y[:, None], axis=1))

  graphdef, params, stats = nnx.split(BatchNormNet(), nnx.Param, nnx.BatchStat)

  def model_at(pure_params, stats):
    # Fresh Variables (tree.map copies them) in the caller's trace.
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, pure_params)
    return nnx.merge(graphdef, state, jax.tree.map(lambda x: x, stats))

  def pure_loss(pure_params, batch):
    # Train mode normalises with the batch's statistics, so the running
    # statistics in `stats` do not affect the loss.
    return loss_fn(model_at(pure_params, stats), batch)

  expected = multirate_sgd(nnx.to_pure_dict(params), pure_loss, data, h=H,
                           momentum=MU, period=period, drift=False,
                           is_fast=lambda path: path.startswith("head"))

  @jax.jit
  def running_stats(pure_params, stats, batch):
    model = model_at(pure_params, stats)
    loss_fn(model, batch)
    return nnx.state(model, nnx.BatchStat)

  # Running statistics as the forward pass of every step, at that step's
  # parameters, updates them.
  want_stats = stats
  for t, batch in enumerate(data):
    before = nnx.to_pure_dict(params) if t == 0 else expected[t - 1]
    want_stats = running_stats(before, want_stats, batch)

  tx = mo.multirate(optax.sgd(H / period, momentum=MU),
                    optax.sgd(H, momentum=MU),
                    labels=mo.nnx.fast_by_filter(HEAD), period=period,
                    drift=False)
  results = {}
  for dispatch in ("cond", "host"):
    model = BatchNormNet()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = mo.nnx.train_step(loss_fn, dispatch=dispatch)
    history, stat_history = [], []
    for batch in data:
      step(model, optimizer, batch)
      params_now, stats_now = nnx.state(model, nnx.Param, nnx.BatchStat)
      history.append(jax.tree.map(np.array, nnx.to_pure_dict(params_now)))
      stat_history.append(jax.tree.map(np.array, nnx.to_pure_dict(stats_now)))
    chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(stat_history[-1], nnx.to_pure_dict(want_stats),
                                rtol=1e-5, atol=1e-6)
    # Step 2 is a fast step: the slow BatchNorm's scale and bias stay, its
    # running statistics move.
    chex.assert_trees_all_equal(history[2]["norm"], history[1]["norm"])
    assert not np.array_equal(stat_history[2]["norm"]["mean"],
                              stat_history[1]["norm"]["mean"])
    results[dispatch] = history
  chex.assert_trees_all_equal(results["cond"], results["host"])


class StoredRngNet(nnx.Module):
  """Dropout drawing its keys from an rng stream stored in the module."""

  def __init__(self):
    rngs = nnx.Rngs(0, dropout=1)
    self.layer0 = nnx.Linear(6, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(jnp.tanh(self.layer0(x))))


def test_stored_rng_stream_advances_on_fast_steps():
  batch = batches(1)[0]
  losses = {}
  for dispatch in ("cond", "host"):
    model = StoredRngNet()
    optimizer = nnx.Optimizer(model, multirate_tx(4), wrt=nnx.Param)
    step = mo.nnx.train_step(nnx_loss, dispatch=dispatch)
    losses[dispatch] = [float(step(model, optimizer, batch)) for _ in range(4)]
    assert int(model.dropout.rngs.count[...]) == 4
  # Same batch on fast steps 1..3: only the dropout masks (and the head)
  # differ, and both dispatch modes draw the same masks.
  assert len(set(losses["host"])) == 4
  assert losses["cond"] == losses["host"]


def mlp_params_of(model):
  return {name: {"w": np.array(getattr(model, name).kernel.get_value()),
                 "b": np.array(getattr(model, name).bias.get_value())}
          for name in NAMES}


def own_jit_step():
  """A Flax-style train step: gradients, metrics and update in one function."""

  @mo.nnx.jit
  def train_step(model, optimizer, metrics, batch):
    grad_fn = mo.nnx.value_and_grad(
        lambda model, batch: (nnx_loss(model, batch), model(batch[0])),
        has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch[1])
    optimizer.update(model, grads)

  return train_step


def new_metrics():
  return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                         loss=nnx.metrics.Average("loss"))


@pytest.mark.parametrize("drift", [False, True])
def test_own_jit_follows_the_published_algorithm(drift):
  period, data = 3, batches(10)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=period, drift=drift, is_fast=is_fast)
  model = MLP(mlp_params())
  optimizer = nnx.Optimizer(model, multirate_tx(period, drift), wrt=nnx.Param)
  metrics, train_step = new_metrics(), own_jit_step()
  history, losses = [], []
  for batch in data:
    losses.append(float(nnx_loss(model, batch)))
    train_step(model, optimizer, metrics, batch)
    history.append(mlp_params_of(model))
  chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
  # The metrics were updated inside the step, with the loss before each update.
  np.testing.assert_allclose(metrics.compute()["loss"], np.mean(losses),
                             rtol=1e-5)
  assert int(optimizer.step[...]) == len(data)


def test_own_jit_runs_one_program_per_phase_and_reads_nothing_back():
  model = MLP(mlp_params())
  optimizer = nnx.Optimizer(model, multirate_tx(4), wrt=nnx.Param)
  metrics, train_step, data = new_metrics(), own_jit_step(), batches(10)
  # The fast phase's program has no backward work for the slow layers: forward
  # 3 dots (twice: loss and logits), head-only backward 1, against 3 + 2.
  full = train_step.program(model, optimizer, metrics, data[0], phase=0)
  fast = train_step.program(model, optimizer, metrics, data[0], phase=1)
  assert hlo_op_count(fast, "dot") == hlo_op_count(full, "dot") - 4
  # Each phase's optimizer update knows its phase: no conditional on the
  # count carries the slow state through branches.
  for program in (full, fast):
    assert "conditional(" not in program.compile().as_text()
  with count_compilations() as compiled:
    for batch in data[:2]:
      train_step(model, optimizer, metrics, batch)
    after_two = compiled[0]
    with count_host_reads() as reads:
      for batch in data[2:]:
        train_step(model, optimizer, metrics, batch)
  assert compiled[0] == after_two
  assert reads[0] == 0


def test_own_jit_donating_its_arguments_follows_the_published_algorithm():
  period, data = 3, batches(7)
  expected = multirate_sgd(mlp_params(), mlp_loss, data, h=H, momentum=MU,
                           period=period, drift=True, is_fast=is_fast)
  model = MLP(mlp_params())
  optimizer = nnx.Optimizer(model, multirate_tx(period, True), wrt=nnx.Param)

  # donate_argnums counts the step's own arguments: model and optimizer.
  @mo.nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, batch):
    loss, grads = mo.nnx.value_and_grad(nnx_loss)(model, batch)
    optimizer.update(model, grads)
    return loss

  first_kernel = model.layer1.kernel.get_value()
  history = []
  for batch in data:
    train_step(model, optimizer, batch)
    history.append(mlp_params_of(model))
  assert first_kernel.is_deleted()  # The model's buffers were donated.
  chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)


def test_own_jit_follows_a_rewound_optimizer():
  data = batches(6)
  want_model = MLP(mlp_params())
  want_optimizer = nnx.Optimizer(want_model, multirate_tx(3), wrt=nnx.Param)
  step = mo.nnx.train_step(nnx_loss)
  for batch in data:
    step(want_model, want_optimizer, batch)

  model = MLP(mlp_params())
  optimizer = nnx.Optimizer(model, multirate_tx(3), wrt=nnx.Param)
  metrics, train_step = new_metrics(), own_jit_step()
  train_step(model, optimizer, metrics, data[0])
  saved = jax.tree.map(jnp.array, nnx.as_pure(
      (nnx.state(model), nnx.state(optimizer))))
  for batch in data[1:4]:
    train_step(model, optimizer, metrics, batch)
  nnx.update(model, saved[0])
  nnx.update(optimizer, saved[1])  # count 1 again: the host count follows it
  for batch in data[1:]:
    train_step(model, optimizer, metrics, batch)
  # Your own step is another program than mo.nnx.train_step's (metrics
  # inside), so XLA may order the float arithmetic differently.
  chex.assert_trees_all_close(mlp_params_of(model), mlp_params_of(want_model),
                              rtol=1e-6, atol=1e-7)


def test_apply_inside_nnx_jit_warns_that_it_is_cond_dispatch():
  model = MLP(mlp_params())
  optimizer = nnx.Optimizer(model, multirate_tx(2), wrt=nnx.Param)
  step = mo.nnx.train_step(nnx_loss, dispatch="host")
  with pytest.warns(UserWarning, match=r"lax.switch program \('cond' "
                    r"dispatch\).*multirate_optax.nnx.jit"):
    nnx.jit(step.apply)(model, optimizer, batches(1)[0])


def _pure(*nodes):
  """The arrays of ``nodes``, rng keys as their key data."""
  def to_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.array(x)
  return jax.tree.map(to_numpy, nnx.to_pure_dict(nnx.state(nodes)))


def _copy(node):
  """A clone of ``node`` with its own buffers (the step donates them)."""
  node = nnx.clone(node)
  nnx.update(node, jax.tree.map(jnp.copy, nnx.state(node)))
  return node


@pytest.mark.parametrize("change", ["submodule", "variable", "static"])
def test_structure_changed_between_steps_is_followed(change, monkeypatch):
  """The kept split is made again when the graph changes, and only then."""
  from multirate_optax.nnx import _train_step as nnx_step
  splits = [0]
  split = nnx_step._split

  def counting_split(*args):
    splits[0] += 1
    return split(*args)

  monkeypatch.setattr(nnx_step, "_split", counting_split)
  data = batches(8)
  model = StoredRngNet()
  optimizer = nnx.Optimizer(model, multirate_tx(2), wrt=nnx.Param)
  step = mo.nnx.train_step(nnx_loss, dispatch="host")
  for batch in data[:3]:
    step(model, optimizer, batch)
  # A value replaced from outside (a restored checkpoint) is no change.
  nnx.update(model, jax.tree.map(jnp.array, nnx.state(model)))
  step(model, optimizer, data[3])
  assert splits[0] == 1
  if change == "submodule":
    model.head = nnx.Linear(16, 3, rngs=nnx.Rngs(7))
  elif change == "variable":
    model.layer0.kernel = nnx.Param(model.layer0.kernel[...] * 2)
  else:
    model.dropout.deterministic = True
  # What the step must do from here: what a new step does on a copy.
  want_model, want_optimizer = map(_copy, (model, optimizer))
  want_step = mo.nnx.train_step(nnx_loss, dispatch="host")
  before = _pure(model)
  losses, want_losses = [], []
  for batch in data[4:]:
    losses.append(np.array(step(model, optimizer, batch)))
    want_losses.append(np.array(want_step(want_model, want_optimizer, batch)))
  assert splits[0] == 3  # Once for the change, once for the new step.
  chex.assert_trees_all_equal(losses, want_losses)
  chex.assert_trees_all_equal(_pure(model, optimizer),
                              _pure(want_model, want_optimizer))
  # The head is fast: it moved on every step, the new one included.
  assert not np.array_equal(_pure(model)[0]["head"]["kernel"],
                            before[0]["head"]["kernel"])


class DropoutMLP(nnx.Module):
  """The MLP with dropout, its keys from the rngs given to each call (as in
  Flax's NNX MNIST example)."""

  def __init__(self):
    mlp = MLP(mlp_params())
    self.layer0, self.layer1, self.head = mlp.layer0, mlp.layer1, mlp.head
    self.dropout = nnx.Dropout(0.3)

  def __call__(self, x, rngs):
    h = self.dropout(jnp.tanh(self.layer0(x)), rngs=rngs)
    return self.head(jnp.tanh(self.layer1(h)))


def dropout_loss(model, batch, rngs, metrics):
  x, y = batch
  logits = model(x, rngs)
  loss = cross_entropy(logits, y)
  metrics.update(loss=loss, logits=logits, labels=y)
  return loss


def hand_written_nnx_loop(model, loss_fn, data, args_of, period):
  """The published algorithm (tests/_reference.py) on an NNX model, its
  gradients of all parameters from a plain ``nnx.jit`` step with
  ``nnx.value_and_grad``, which advances the graph nodes of
  ``args_of(batch)``."""

  @nnx.jit
  def grads_of(model, *args):
    return nnx.value_and_grad(loss_fn)(model, *args)[1]

  def grad_fn(params, batch):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return nnx.to_pure_dict(grads_of(model, *args_of(batch)))

  return multirate_sgd(nnx.to_pure_dict(nnx.state(model, nnx.Param)), None,
                       data, h=H, momentum=MU, period=period, drift=False,
                       is_fast=is_fast, grad_fn=grad_fn)


def params_now(model):
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_graph_node_arguments_follow_a_hand_written_nnx_loop():
  """Dropout rngs and a MultiMetric given to the step, used in the loss."""
  period, data = 3, batches(10)
  want_rngs, want_metrics = nnx.Rngs(dropout=1), new_metrics()
  expected = hand_written_nnx_loop(
      DropoutMLP(), dropout_loss, data,
      lambda batch: (batch, want_rngs, want_metrics), period)
  results = {}
  for dispatch in ("cond", "host"):
    model, rngs, metrics = DropoutMLP(), nnx.Rngs(dropout=1), new_metrics()
    optimizer = nnx.Optimizer(model, multirate_tx(period), wrt=nnx.Param)
    step = mo.nnx.train_step(dropout_loss, dispatch=dispatch)
    history = []
    with count_compilations() as compiled:
      for t, batch in enumerate(data):
        if t == 2:
          after_two = compiled[0]
          with count_host_reads() as reads:
            for later in data[2:]:
              step(model, optimizer, later, rngs, metrics)
              history.append(params_now(model))
          break
        step(model, optimizer, batch, rngs, metrics)
        history.append(params_now(model))
    # One program per phase (host) or one in all (cond), compiled in the first
    # two steps; nothing read back from the device per step.
    assert compiled[0] == after_two
    assert reads[0] == 0
    chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
    # One dropout key drawn per step, as under nnx.jit: the same count and
    # so the same masks.
    assert int(rngs.dropout.count[...]) == int(want_rngs.dropout.count[...])
    assert int(rngs.dropout.count[...]) == len(data)
    # The metrics were updated inside the loss with each step's loss and
    # logits, before the update.
    computed, want = metrics.compute(), want_metrics.compute()
    np.testing.assert_allclose(computed["loss"], want["loss"], rtol=1e-5)
    assert float(computed["accuracy"]) == float(want["accuracy"])
    assert int(metrics.loss.count[...]) == len(data)
    results[dispatch] = history, _pure(rngs), _pure(metrics)
  chex.assert_trees_all_equal(results["cond"], results["host"])


def test_graph_node_arguments_through_apply_inside_nnx_jit():
  period, data = 3, batches(6)
  want_rngs, want_metrics = nnx.Rngs(dropout=1), new_metrics()
  expected = hand_written_nnx_loop(
      DropoutMLP(), dropout_loss, data,
      lambda batch: (batch, want_rngs, want_metrics), period)
  model, rngs, metrics = DropoutMLP(), nnx.Rngs(dropout=1), new_metrics()
  optimizer = nnx.Optimizer(model, multirate_tx(period), wrt=nnx.Param)
  step = nnx.jit(mo.nnx.train_step(dropout_loss, dispatch="cond").apply)
  history = []
  for batch in data:
    step(model, optimizer, batch, rngs, metrics)
    history.append(params_now(model))
  chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
  assert int(rngs.dropout.count[...]) == int(want_rngs.dropout.count[...])
  np.testing.assert_allclose(metrics.compute()["loss"],
                             want_metrics.compute()["loss"], rtol=1e-5)


class DistilledNet(StoredRngNet):
  """StoredRngNet whose loss also uses a teacher and the model's own rng
  stream, both given to the step as arguments, nested in a tuple."""


def distill_loss(model, batch, nodes):
  teacher, stream = nodes
  x, y = batch
  logits = model(x)  # Draws from the stream stored in the model.
  noise = 0.1 * jax.random.normal(stream(), logits.shape)  # ... and again.
  return (cross_entropy(logits + noise, y)
          + 0.5 * jnp.mean((logits - teacher(x)) ** 2))


def test_graph_node_arguments_shared_with_the_model_and_nested():
  """A stream the model holds, given again, is one stream (it advances twice
  a step, as the model's own does); a teacher module's parameters are not
  trained."""
  period, data = 2, batches(6)

  def teacher():
    return nnx.Linear(6, 3, rngs=nnx.Rngs(5))

  # nnx.value_and_grad refuses a variable both in its differentiated
  # argument and in another: the hand loop's loss reaches the stream through
  # the model.
  want_model, want_teacher = DistilledNet(), teacher()
  expected = hand_written_nnx_loop(
      want_model,
      lambda model, batch, teacher: distill_loss(
          model, batch, (teacher, model.dropout.rngs)),
      data, lambda batch: (batch, want_teacher), period)
  model, teacher_model = DistilledNet(), teacher()
  teacher_before = _pure(teacher_model)
  optimizer = nnx.Optimizer(model, multirate_tx(period), wrt=nnx.Param)
  step = mo.nnx.train_step(distill_loss, dispatch="host")
  history = []
  for batch in data:
    step(model, optimizer, batch, (teacher_model, model.dropout.rngs))
    history.append(params_now(model))
  chex.assert_trees_all_close(history, expected, rtol=1e-5, atol=1e-6)
  assert int(model.dropout.rngs.count[...]) == 2 * len(data)
  assert int(want_model.dropout.rngs.count[...]) == 2 * len(data)
  chex.assert_trees_all_equal(_pure(teacher_model), teacher_before)


class TestBadInput:

  def test_value_and_grad_outside_multirate_jit(self):
    model = MLP(mlp_params())

    @nnx.jit
    def grads(model, batch):
      return mo.nnx.value_and_grad(nnx_loss)(model, batch)

    with pytest.raises(RuntimeError, match=r"outside a function compiled with "
                       r"multirate_optax.nnx.jit.*instead of nnx.jit"):
      grads(model, batches(1)[0])

  def test_multirate_jit_without_an_update(self):
    model = MLP(mlp_params())
    optimizer = nnx.Optimizer(model, multirate_tx(2), wrt=nnx.Param)
    evaluate = mo.nnx.jit(lambda model, optimizer, batch: nnx_loss(model, batch))
    with pytest.raises(TypeError, match=r"did not update its optimizer.*"
                       r"evaluation\) with nnx.jit"):
      evaluate(model, optimizer, batches(1)[0])

  def test_multirate_jit_with_positional_shardings(self):
    with pytest.raises(TypeError, match=r"positional in_shardings would not "
                       r"line up.*jax.device_put"):
      mo.nnx.jit(in_shardings=(None, None, None))(nnx_loss)

  def test_multirate_jit_without_an_optimizer(self):
    model = MLP(mlp_params())
    with pytest.raises(TypeError, match=r"one nnx.Optimizer among the "
                       r"function's arguments, found 0"):
      mo.nnx.jit(nnx_loss)(model, batches(1)[0])


  def test_filter_that_selects_no_parameter(self):
    tx = mo.multirate(optax.sgd(0.1),
                      labels=mo.nnx.fast_by_filter(nnx.PathContains("heads")),
                      period=2)
    with pytest.raises(ValueError, match=r"PathContains\('heads'.*selects none "
                       r"of the 6 parameters.*'head/bias'"):
      nnx.Optimizer(MLP(mlp_params()), tx, wrt=nnx.Param)

  def test_fast_by_filter_needs_a_state(self):
    with pytest.raises(TypeError, match="labels an nnx.State"):
      mo.nnx.fast_by_filter(HEAD)(mlp_params())

  def test_optimizer_without_schedule(self):
    model = MLP(mlp_params())
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="holds no timetable of active groups"):
      mo.nnx.train_step(nnx_loss)(model, optimizer, batches(1)[0])

  def test_model_the_optimizer_was_not_built_for(self):
    optimizer = nnx.Optimizer(MLP(mlp_params()), multirate_tx(2), wrt=nnx.Param)
    other = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="the parameters have 2 leaves, but the optimizer was built for 6"):
      mo.nnx.train_step(nnx_loss)(other, optimizer, batches(1)[0])

  @pytest.mark.parametrize("dispatch", ["cond", "host"])
  def test_not_an_optimizer(self, dispatch):
    model = MLP(mlp_params())
    with pytest.raises(TypeError, match="expected an nnx.Optimizer"):
      mo.nnx.train_step(nnx_loss, dispatch=dispatch)(model, model, batches(1)[0])

  def test_optimizer_among_the_extra_arguments(self):
    model = MLP(mlp_params())
    optimizer = nnx.Optimizer(model, multirate_tx(2), wrt=nnx.Param)
    step = mo.nnx.train_step(lambda model, batch, optimizer: nnx_loss(model, batch))
    with pytest.raises(TypeError, match=r"nnx.Optimizer was given again among "
                       r"the step's extra arguments.*pass it once"):
      step(model, optimizer, batches(1)[0], optimizer)

  def test_loss_signature(self):
    model = MLP(mlp_params())
    optimizer = nnx.Optimizer(model, multirate_tx(2), wrt=nnx.Param)
    step = mo.nnx.train_step(lambda model: 0.0)
    with pytest.raises(TypeError, match="cannot be called as loss_fn"):
      step(model, optimizer, batches(1)[0])
