"""Length bucketing of the text task against padding every text to the maximum.

Run from the repository root::

  python -m benchmarks.text_bucketing            # all-MiniLM-L6-v2, 48 tokens
  python -m benchmarks.text_bucketing --quick    # a tiny random MiniLM

Measures, in one process, after every program is compiled (the warm-up):

* the lengths of the Rotten Tomatoes texts (tokens per text, [CLS] and [SEP]
  included, before truncation), how many fit each bucket, and which bucket
  the train batches (32 random texts, the experiment's order, 3 seeds, one
  epoch) and the evaluation batches (128 texts, shortest first) fall in;
* train-all's train step at every bucket length against the step at the
  maximum: medians of interleaved repeats, and the mean step over the
  batches' buckets (the text task's training with bucketing) against the
  maximum (without);
* one pass over the validation split (730 texts) with bucketing against
  padding to the maximum: medians of interleaved repeats, and how many
  predictions and how large a logit differ between the two.

Times are the process's CPU seconds (all threads, ``--clock process``) or
wall-clock. Prints the table, writes
``benchmarks/results/text_bucketing[_quick].json``. ``--quick`` runs a
randomly initialised 2-layer MiniLM of width 32 on 200 validation texts:
it checks the mechanism, its times are not the model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import write_json
from experiments.data import (
    LengthBuckets, load_rotten_tomatoes, split_texts)
from experiments.finetune.tasks import TEXT
from experiments.finetune.tasks.text import length_buckets
from experiments.finetune.training import (
    accuracy, batches, dropout_key, init_optimizer_state, make_step,
    split_variables, warm_up)
from experiments.models import MiniLM, MiniLMTokenizer
from experiments.models.minilm import MiniLMConfig

RESULTS = Path(__file__).resolve().parent / "results"
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
TINY = MiniLMConfig(hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64)


def length_distribution(buckets: LengthBuckets) -> dict[str, Any]:
  """Tokens per Rotten Tomatoes text (untruncated) and the share of texts
  that fit each bucket."""
  texts = load_rotten_tomatoes().texts
  tokens = MiniLMTokenizer()(list(texts), 512)
  lengths = tokens.attention_mask.sum(axis=1)
  percentiles = (10, 25, 50, 75, 90, 95, 99, 100)
  fits, below = {}, 0
  for length in buckets.lengths:
    count = int(np.sum((lengths > below) & (lengths <= length)))
    fits[length] = count
    below = length
  return {
      "texts": len(lengths),
      "tokens_percentiles": dict(zip(
          percentiles, np.percentile(lengths, percentiles).tolist())),
      "mean_tokens": float(lengths.mean()),
      "texts_per_bucket": fits,
      "truncated": int(np.sum(lengths > buckets.max_length)),
  }


def bucket_shares(buckets: LengthBuckets, longest: Sequence[int]
                  ) -> dict[int, float]:
  """Share of batches whose longest text ``longest`` puts in each bucket."""
  chosen = [buckets.length_for(int(n)) for n in longest]
  return {length: chosen.count(length) / len(chosen)
          for length in buckets.lengths}


def train_batch_longest(train, batch_size: int, seeds: Sequence[int],
                        steps: int) -> list[int]:
  return [int(LengthBuckets.text_lengths(inputs).max())
          for seed in seeds for inputs, _ in batches(train, batch_size, seed,
                                                     steps)]


def eval_batch_longest(data, batch_size: int) -> list[int]:
  lengths = np.sort(LengthBuckets.text_lengths(data.inputs))
  return [int(lengths[start:start + batch_size].max())
          for start in range(0, len(lengths), batch_size)]


def time_steps(step, method, optimizer, variables, train, buckets,
               batch_size: int, repeats: int, steps: int,
               clock) -> dict[int, float]:
  """Median seconds of a train step at each bucket length, the lengths
  interleaved within each repeat (the same first batch cut to each)."""
  params, state = split_variables(variables)
  opt_state = init_optimizer_state(method, optimizer, params)
  inputs, labels = train.inputs[:batch_size], train.labels[:batch_size]
  key = dropout_key(0)
  times = {length: [] for length in buckets.lengths}
  number = 0
  for _ in range(repeats):
    for length in buckets.lengths:
      batch = inputs[..., :length]
      start = clock()
      for _ in range(steps):
        params, opt_state, (_, state) = step(
            params, opt_state, state, batch, labels, key, np.int32(number))
        number += 1
      jax.block_until_ready(params)
      times[length].append((clock() - start) / steps)
  return {length: statistics.median(t) for length, t in times.items()}


def time_validation(predict, variables, validation, buckets, batch_size: int,
                    repeats: int, clock) -> dict[str, Any]:
  """Median seconds of one validation pass with and without bucketing,
  interleaved, after one untimed pass of each (compiles)."""
  results = {}
  for name, chosen in (("bucketed", buckets), ("padded", None)):
    results[name] = accuracy(predict, variables, validation, batch_size,
                             buckets=chosen)
  times = {"bucketed": [], "padded": []}
  for _ in range(repeats):
    for name, chosen in (("bucketed", buckets), ("padded", None)):
      start = clock()
      accuracy(predict, variables, validation, batch_size, buckets=chosen)
      times[name].append(clock() - start)
  return {"accuracy": results,
          "seconds": {name: statistics.median(t) for name, t in times.items()},
          "repeats": times}


def logit_agreement(model, variables, validation, buckets,
                    batch_size: int) -> dict[str, Any]:
  """Each validation text's logits in its bucketed batch (shortest first)
  against its batch padded to the maximum (the data's order)."""
  apply = jax.jit(lambda v, x: model.apply(v, x[:, 0], x[:, 1]))

  def logits(inputs, bucketed):
    out = []
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0), (0, 0)))
      if bucketed:
        padded = buckets.trim(padded)
      out.append(np.asarray(apply(variables, padded))[:len(chunk)])
    return np.concatenate(out)

  order = np.argsort(LengthBuckets.text_lengths(validation.inputs),
                     kind="stable")
  bucketed = np.empty((len(order), 2), np.float32)
  bucketed[order] = logits(validation.inputs[order], True)
  padded = logits(validation.inputs, False)
  return {"max_abs_logit_difference": float(np.max(np.abs(bucketed - padded))),
          "max_abs_logit": float(np.max(np.abs(padded))),
          "predictions_differing": int(np.sum(
              bucketed.argmax(-1) != padded.argmax(-1)))}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.text_bucketing",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a tiny random MiniLM, 200 validation texts")
  parser.add_argument("--repeats", type=int, help="interleaved repeats "
                      "(default 5, quick 2)")
  parser.add_argument("--steps", type=int, default=2,
                      help="train steps per timing")
  parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
  parser.add_argument("--json", type=Path,
                      help="default benchmarks/results/text_bucketing"
                      "[_quick].json")
  args = parser.parse_args(argv)
  clock = CLOCKS[args.clock]
  repeats = args.repeats or (2 if args.quick else 5)
  settings = TEXT.full if not args.quick else dataclasses.replace(
      TEXT.full, split_sizes=(None, 200, 1))
  buckets = length_buckets(settings)
  batch_size, eval_batch_size = settings.batch_size, 4 * settings.batch_size
  start_wall, load_at_start = time.perf_counter(), os.getloadavg()
  distribution = length_distribution(buckets)
  splits = TEXT.load_splits(settings)
  steps_per_epoch = len(splits.train.labels) // batch_size
  shares = {
      "train": bucket_shares(buckets, train_batch_longest(
          splits.train, batch_size, (0, 1, 2), steps_per_epoch)),
      "evaluation": bucket_shares(buckets, eval_batch_longest(
          splits.validation, eval_batch_size)),
  }
  if args.quick:
    encoder = MiniLM(TINY)
    ids = jnp.ones((1, 8), jnp.int32)
    pretrained = encoder, encoder.init(jax.random.key(0), ids, ids)
  else:
    pretrained = TEXT.load_pretrained()
  method = TEXT.method("train_all")
  model, variables = TEXT.fresh_variables(pretrained, 0, 2)
  optimizer = TEXT.make_optimizer(
      method, {"encoder_learning_rate": 5e-5, "head_learning_rate": 1e-2},
      settings, 1000)
  step = make_step(method, TEXT.make_loss(model, settings), optimizer,
                   variables["params"])
  compile_seconds, _ = warm_up(step, method, optimizer, variables,
                               splits.train, batch_size, buckets=buckets,
                               clock=clock)
  step_seconds = time_steps(
      step, method, optimizer, TEXT.fresh_variables(pretrained, 0, 2)[1],
      splits.train, buckets, batch_size, repeats, args.steps, clock)
  full = step_seconds[buckets.max_length]
  mean_bucketed = sum(share * step_seconds[length]
                      for length, share in shares["train"].items())
  predict = TEXT.make_predict(model)
  variables = TEXT.fresh_variables(pretrained, 0, 2)[1]  # Donated above.
  validation = time_validation(predict, variables, splits.validation, buckets,
                               eval_batch_size, repeats, clock)
  agreement = logit_agreement(model, variables, splits.validation, buckets,
                              eval_batch_size)
  report = {
      "command": " ".join(["python -m benchmarks.text_bucketing",
                           *(sys.argv[1:] if argv is None else argv)]),
      "model": "tiny random MiniLM" if args.quick else "all-MiniLM-L6-v2",
      "clock": args.clock, "repeats": repeats, "steps_per_timing": args.steps,
      "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
      "buckets": buckets.lengths, "batch_size": batch_size,
      "eval_batch_size": eval_batch_size,
      "validation_texts": len(splits.validation.labels),
      "lengths": distribution, "batch_bucket_shares": shares,
      "warm_up_seconds": compile_seconds,
      "train_step_seconds": step_seconds,
      "train_step_over_max": {length: t / full
                              for length, t in step_seconds.items()},
      "train_mean_step_bucketed_over_padded": mean_bucketed / full,
      "validation": validation,
      "validation_bucketed_over_padded": (validation["seconds"]["bucketed"]
                                          / validation["seconds"]["padded"]),
      "logit_agreement": agreement,
      "wall_seconds": time.perf_counter() - start_wall,
  }
  print(format_report(report))
  write_json(report, args.json or RESULTS / (
      f"text_bucketing{'_quick' if args.quick else ''}.json"))
  return report


def format_report(report: dict[str, Any]) -> str:
  lengths = report["lengths"]
  lines = [f"{report['model']}, {report['clock']} clock, medians of "
           f"{report['repeats']} interleaved repeats; load average at end "
           + " / ".join(f"{x:.1f}" for x in report["load_average_at_end"]),
           "",
           f"tokens per text ({lengths['texts']} texts): median "
           f"{lengths['tokens_percentiles'][50]:g}, 90% "
           f"{lengths['tokens_percentiles'][90]:g}, max "
           f"{lengths['tokens_percentiles'][100]:g}; "
           f"{lengths['truncated']} truncated at "
           f"{report['buckets'][-1]}",
           "",
           "| bucket | texts | train batches | eval batches | step s | "
           "step / max |",
           "|---|---|---|---|---|---|"]
  shares = report["batch_bucket_shares"]
  for length in report["buckets"]:
    lines.append(
        f"| {length} | {lengths['texts_per_bucket'][length]} | "
        f"{shares['train'][length]:.1%} | {shares['evaluation'][length]:.1%} "
        f"| {report['train_step_seconds'][length]:.3f} | "
        f"{report['train_step_over_max'][length]:.2f} |")
  validation = report["validation"]["seconds"]
  agreement = report["logit_agreement"]
  lines += [
      "",
      "train step, mean over the batches' buckets / padded: "
      f"{report['train_mean_step_bucketed_over_padded']:.3f}",
      f"validation pass ({report['validation_texts']} texts): bucketed "
      f"{validation['bucketed']:.2f} s, padded {validation['padded']:.2f} s, "
      f"ratio {report['validation_bucketed_over_padded']:.3f}",
      f"logits bucketed vs padded: max |difference| "
      f"{agreement['max_abs_logit_difference']:.2e} (max |logit| "
      f"{agreement['max_abs_logit']:.2f}), "
      f"{agreement['predictions_differing']} predictions differ",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
