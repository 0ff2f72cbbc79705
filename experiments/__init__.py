"""The paper's experiments, kept out of the installed ``multirate_optax``.

The library is ``multirate_optax``; what lives here only serves experiments on
it, the way Flax keeps its examples outside ``flax/``:

* :mod:`experiments.finetune`: fine-tune a pretrained EfficientNet-Lite0 on
  scikit-learn's digits with multirate training and every baseline.
* :mod:`experiments.models`: EfficientNet-Lite0 in Flax, its ImageNet weights
  read from PyTorch's file without torch, and a faster depthwise convolution
  for XLA:CPU.
* :mod:`experiments.data`: the digits, stratified splits and minibatches.

It is not installed by pip: after ``python -m pip install -e ".[finetune]"``,
run it from the repository root as ``python -m experiments.finetune``.
"""
