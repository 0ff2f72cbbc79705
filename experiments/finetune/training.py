"""Train steps, and one timed training run evaluated at regular points.

Shared by the tasks. A task supplies the loss
``loss(params, state, inputs, labels, key, step) -> (loss, state)``, where
``state`` is the model's other variables (BatchNorm statistics; ``{}`` for the
text model), and a jitted ``predict(variables, inputs) -> classes``.

The plain methods differentiate only their trained top-level modules
(``jax.value_and_grad`` of the trained subtree, one jitted step with donated
buffers); multirate uses :func:`multirate_optax.train_step`, whose fast steps
differentiate only the fast modules.

Timing: every train-step program (each multirate phase) is compiled and run
first on a throwaway copy of the state (:func:`warm_up`), which also measures
the step time a budgeted run first plans with; that time is reported
separately. Training time is the wall-clock of the training loop (host
batching included), blocked on the state at each evaluation point; the clock
stops while the model is evaluated (:func:`train_and_evaluate`). A budgeted
run re-plans its steps at each evaluation point from the speed measured so
far: a probe of a few steps on a shared CPU can be off by half.

Token inputs can be bucketed (:class:`experiments.data.LengthBuckets`): each
train batch (the same examples, in the same order) and each evaluation batch
cut to the shortest of a few lengths that fits its longest text; the warm-up
then compiles every program at every bucket length, so the clock never
includes a compile.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import LengthBuckets, shuffled_batches
from experiments.finetune.optimizers import rescale_decay
from experiments.finetune.settings import Method, trained_modules
import multirate_optax as mo

PyTree = Any
Clock = Callable[[], float]


class Examples(NamedTuple):
  """Examples of one split, for any task.

  Attributes:
    inputs: one array with the examples along its first axis (images; token
      ids and attention masks stacked along axis 1).
    labels: int32, shape (n,), class indices from 0.

  :class:`experiments.data.Dataset` (``images, labels``) has the same shape.
  """
  inputs: np.ndarray
  labels: np.ndarray


def subtree_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                 trained: Sequence[str]) -> Callable[..., Any]:
  """A plain jitted step that differentiates only the top-level modules ``trained``.

  Same call as :class:`multirate_optax.TrainStep` with ``has_aux=True``:
  ``params, opt_state, (loss, aux) = step(params, opt_state, *args)``, with
  ``opt_state`` the optimizer's state for the trained subtree.
  """

  def step(params, opt_state, *args):
    subtree = {name: params[name] for name in trained}
    value, grads = jax.value_and_grad(
        lambda subtree: loss_fn({**params, **subtree}, *args), has_aux=True)(
            subtree)
    updates, opt_state = optimizer.update(grads, opt_state, subtree)
    return ({**params, **optax.apply_updates(subtree, updates)}, opt_state,
            value)

  return jax.jit(step, donate_argnums=(0, 1))


def make_step(method: Method, loss_fn: Callable[..., Any],
              optimizer: optax.GradientTransformation,
              params: Mapping[str, Any]) -> Callable[..., Any]:
  """The method's compiled train step.

  The optimizer's numbers (rates, decay length) live in its state, so the
  step serves every optimizer the task builds for this method.
  """
  if method.timetabled:
    return mo.train_step(loss_fn, optimizer, has_aux=True)
  return subtree_step(loss_fn, optimizer, trained_modules(method, params))


def init_optimizer_state(method: Method, optimizer: optax.GradientTransformation,
                         params: Mapping[str, Any]) -> optax.OptState:
  if method.timetabled:
    return optimizer.init(params)
  return optimizer.init(
      {name: params[name] for name in trained_modules(method, params)})


def dropout_key(seed: int) -> jax.Array:
  """The key of a run's dropout and stochastic depth.

  The 'rbg' implementation: on a 2-core CPU it made a classifier-only step
  about 2 ms (a sixth) faster than the default threefry. Warm-up and runs must
  use the same implementation, or the step compiles again.
  """
  return jax.random.key(seed, impl="rbg")


def batches(data: Examples, batch_size: int, seed: int, steps: int,
            buckets: Optional[LengthBuckets] = None,
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``steps`` minibatches: shuffled epochs one after another, the last cut
  short (the same first batches whatever ``steps``).

  With ``buckets`` (token inputs), each batch is cut to the bucket of its
  longest text; which examples a batch holds, and in which order, is the
  same as without.
  """
  inputs, labels = data
  epoch, produced = 0, 0
  while produced < steps:
    for batch_inputs, batch_labels in shuffled_batches(
        inputs, labels, batch_size, seed=seed, epoch=epoch):
      yield (batch_inputs if buckets is None else buckets.trim(batch_inputs),
             batch_labels)
      produced += 1
      if produced == steps:
        return
    epoch += 1


def train_buckets(buckets: LengthBuckets, data: Examples, batch_size: int,
                  seeds: Iterable[int], steps: int,
                  min_share: float = 0.05) -> LengthBuckets:
  """The buckets the training batches of ``seeds`` need, up to ``steps``
  each: those that at least ``min_share`` of the batches fall in, and the
  longest (:meth:`~experiments.data.LengthBuckets.used_by`).

  A batch of a bucket left out goes to the next longer one kept, so that
  the warm-up compiles no program for a length few steps would use.
  """
  longest = [int(LengthBuckets.text_lengths(inputs).max(initial=0))
             for seed in seeds
             for inputs, _ in batches(data, batch_size, seed, steps)]
  return buckets.used_by(np.asarray(longest, np.int64), min_share)


def split_variables(variables: Mapping[str, Any]) -> tuple[PyTree, PyTree]:
  """``(params, state)``: the parameters, and every other collection."""
  return variables["params"], {k: v for k, v in variables.items()
                               if k != "params"}


def run_steps(step, params, opt_state, state, steps: Iterable[tuple],
              key: jax.Array, first: int = 0) -> tuple[PyTree, PyTree, PyTree]:
  """Runs ``step`` on every batch, numbered from ``first`` (the dropout key's
  fold); returns the params, optimizer state and model state, not blocked on."""
  for number, (inputs, labels) in enumerate(steps, start=first):
    params, opt_state, (_, state) = step(
        params, opt_state, state, inputs, labels, key, np.int32(number))
  return params, opt_state, state


def warm_up(step, method: Method, optimizer: optax.GradientTransformation,
            variables: Mapping[str, Any], data: Examples, batch_size: int,
            probe_steps: int = 0,
            clock: Clock = time.perf_counter,
            buckets: Optional[LengthBuckets] = None,
            ) -> tuple[float, Optional[float]]:
  """Compiles every program of ``step`` on ``variables`` (a throwaway copy),
  then times ``probe_steps`` more steps.

  Two steps compile: the first is a multirate slow step, the second a fast
  one. A multirate probe should cover whole cycles, so that its mean is the
  mean over a cycle. With ``buckets`` (token inputs), every program at every
  bucket length (the first batch cut to it): ``len(buckets.lengths)`` times
  the phases; the probe runs at the longest.

  Returns:
    The seconds of the compiling steps (compilation and one run of each
    program), and the mean seconds of a probed step (``None`` without probe).
  """
  params, state = split_variables(variables)
  opt_state = init_optimizer_state(method, optimizer, params)
  inputs, labels = data[0][:batch_size], data[1][:batch_size]
  key = dropout_key(0)
  start = clock()
  lengths = [None] if buckets is None else buckets.lengths
  for index, length in enumerate(lengths):  # The longest last: the probe's.
    batch = (inputs if length is None else inputs[..., :length], labels)
    if method.timetabled and index:  # From the first phase again.
      opt_state = at_count(opt_state, 0)
    params, opt_state, state = jax.block_until_ready(
        run_steps(step, params, opt_state, state, [batch] * 2, key))
    if method.timetabled:  # Every phase's program, not only those of 0, 1.
      timetable = mo.find_timetable_state(opt_state).timetable
      for count in phase_steps(timetable):
        if timetable.phase(count) in (timetable.phase(0), timetable.phase(1)):
          continue
        params, opt_state, state = jax.block_until_ready(run_steps(
            step, params, at_count(opt_state, count), state, [batch], key,
            first=count))
  compile_seconds = clock() - start
  if not probe_steps:
    return compile_seconds, None
  start = clock()
  jax.block_until_ready(run_steps(step, params, opt_state, state,
                                  [batch] * probe_steps, key, first=2))
  return compile_seconds, (clock() - start) / probe_steps


def phase_steps(timetable: mo.Timetable, limit: int = 1_000_000) -> list[int]:
  """The first step of each phase of ``timetable``, in the order they come.

  Example:
    >>> import multirate_optax as mo
    >>> phase_steps(mo.UnfreezingTimetable(('head', 'top', 'bottom'), (0, 4, 8)))
    [0, 4, 8]
  """
  first: dict[int, int] = {}
  for count in range(limit):
    first.setdefault(timetable.phase(count), count)
    if len(first) == len(timetable.phases):
      break
  return sorted(first.values())


def at_count(opt_state: PyTree, count: int) -> PyTree:
  """``opt_state`` with its timetable's count set to ``count`` (a warm-up
  copy that runs a later phase's program)."""
  is_state = lambda node: isinstance(node, mo.TimetableState)
  return jax.tree.map(
      lambda node: dataclasses.replace(
          node, count=jnp.asarray(count, jnp.int32)) if is_state(node) else node,
      opt_state, is_leaf=is_state)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How long one run trains, and where it is evaluated.

  Attributes:
    steps: the planned steps; the learning rates decay over them.
    evaluate_every: steps between evaluation points (the last step is
      evaluated too).
    budget: training seconds allowed (``None``: run the whole plan). The run
      stops at the first evaluation point at or past it, and at each point
      before its plan's end re-plans its steps from the speed it has measured
      so far (:func:`replanned_steps`).
    max_steps: a re-plan never exceeds this many steps (``None``: ``steps``).
  """
  steps: int
  evaluate_every: int
  budget: Optional[float] = None
  max_steps: Optional[int] = None


def replanned_steps(done: int, elapsed: float, budget: float,
                    max_steps: int) -> int:
  """Steps that fit in ``budget`` at the mean step time so far.

  At least one more than ``done``, at most ``max_steps``.

  Example:
    >>> replanned_steps(10, 5.0, 20.0, 1000), replanned_steps(10, 5.0, 20.0, 30)
    (40, 30)
  """
  more = int((budget - elapsed) * done / elapsed) if elapsed > 0 else 0
  return max(done + 1, min(max_steps, done + more))


class Run(NamedTuple):
  """What one run produced.

  Attributes:
    points: one dict per evaluation point, in order: ``step``, ``epoch``
      (steps over steps per epoch), ``train_seconds`` (training clock at the
      point), ``validation_accuracy``, ``planned_steps`` (the plan after the
      point's re-plan).
    checkpoints: host copies of the variables at the points that improved
      the validation accuracy (:func:`experiments.finetune.budget.improvements`),
      by point index: the only ones a budget can report, to be tested after
      training.
    variables: the final variables.
    train_seconds: the training clock at the end.
  """
  points: list[dict[str, Any]]
  checkpoints: dict[int, PyTree]
  variables: PyTree
  train_seconds: float


def train_and_evaluate(
    step, method: Method, optimizer: optax.GradientTransformation,
    variables: Mapping[str, Any], data: Examples, plan: Plan,
    batch_size: int, seed: int,
    validate: Optional[Callable[[PyTree], float]] = None,
    clock: Clock = time.perf_counter,
    buckets: Optional[LengthBuckets] = None) -> Run:
  """Trains from ``variables`` (consumed) along ``plan``; evaluates on the way.

  Args:
    step, method, optimizer: the method's compiled step and an optimizer of
      its family (its state is initialised here).
    variables: the starting variables; their buffers are donated.
    data: the train split.
    plan: steps, evaluation interval and budget.
    batch_size: examples per step.
    seed: order of the batches, dropout.
    validate: variables to validation accuracy, called before the first
      step and at every evaluation point while the clock is stopped;
      ``None``: no evaluation (a plain timed run).
    clock: seconds, e.g. :func:`time.perf_counter`; a parameter for the
      tests.
    buckets: token inputs: each batch cut to the bucket of its longest text
      (:func:`batches`); the step must have been warmed up at every bucket
      length (:func:`warm_up`), or a new length compiles on the clock.
  """
  params, state = split_variables(variables)
  opt_state = init_optimizer_state(method, optimizer, params)
  steps_per_epoch = len(data[1]) // batch_size
  key = dropout_key(seed)
  max_steps = plan.steps if plan.max_steps is None else plan.max_steps
  planned = plan.steps
  points: list[dict[str, Any]] = []
  checkpoints: dict[int, PyTree] = {}
  best = -np.inf

  def evaluate(done: int, seconds: float) -> None:
    nonlocal best
    current = {"params": params, **state}
    accuracy = validate(current)
    points.append({"step": done, "epoch": done / steps_per_epoch,
                   "train_seconds": seconds, "validation_accuracy": accuracy,
                   "planned_steps": planned})
    if accuracy > best:
      best = accuracy
      checkpoints[len(points) - 1] = jax.device_get(current)

  if validate is not None:
    evaluate(0, 0.0)
  elapsed, done, start = 0.0, 0, clock()
  for inputs, labels in batches(data, batch_size, seed, max_steps, buckets):
    params, opt_state, (_, state) = step(
        params, opt_state, state, inputs, labels, key, np.int32(done))
    done += 1
    if validate is not None and (done % plan.evaluate_every == 0
                                 or done == planned):
      jax.block_until_ready((params, state))
      elapsed += clock() - start
      if plan.budget is not None and done < planned and elapsed < plan.budget:
        # Re-planned before the point is recorded, so that it says the plan
        # the run continues with; the decay stretches with the plan.
        replanned = replanned_steps(done, elapsed, plan.budget, max_steps)
        opt_state = rescale_decay(opt_state, replanned / planned)
        planned = replanned
      evaluate(done, elapsed)
      if plan.budget is not None and elapsed >= plan.budget:
        break
      start = clock()
    if done >= planned:
      break
  jax.block_until_ready((params, state))
  if not points or points[-1]["step"] != done:
    elapsed += clock() - start
  return Run(points, checkpoints, {"params": params, **state}, elapsed)


def correct(predict: Callable[[PyTree, np.ndarray], Any], variables: PyTree,
            data: Examples, batch_size: int,
            buckets: Optional[LengthBuckets] = None) -> np.ndarray:
  """Whether each example of ``data`` is classified correctly (booleans, in
  the split's order), in batches of one fixed size.

  With ``buckets`` (token inputs), the examples go shortest first, each
  batch cut to the bucket of its longest text: ``predict`` compiles once per
  bucket, and a batch of short texts costs less. Each example's prediction
  is its own (to float rounding), and the hits are put back in the split's
  order.
  """
  inputs, labels = data
  order = (np.argsort(LengthBuckets.text_lengths(inputs), kind="stable")
           if buckets is not None else np.arange(len(labels)))
  inputs, labels = inputs[order], labels[order]
  hits = np.zeros(len(labels), bool)
  for start in range(0, len(labels), batch_size):
    chunk = inputs[start:start + batch_size]
    padded = np.pad(chunk, ((0, batch_size - len(chunk)),)
                    + ((0, 0),) * (chunk.ndim - 1))
    if buckets is not None:
      padded = buckets.trim(padded)
    predicted = np.asarray(predict(variables, padded))[:len(chunk)]
    hits[order[start:start + batch_size]] = (
        predicted == labels[start:start + batch_size])
  return hits


def accuracy(predict: Callable[[PyTree, np.ndarray], Any], variables: PyTree,
             data: Examples, batch_size: int,
             buckets: Optional[LengthBuckets] = None) -> float:
  """Share of ``data`` classified correctly (:func:`correct`)."""
  return float(np.mean(correct(predict, variables, data, batch_size,
                               buckets)))
