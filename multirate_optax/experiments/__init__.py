"""Experiments that reproduce the multirate paper's claims on a laptop CPU.

* :mod:`multirate_optax.experiments.finetune`: fine-tune a pretrained
  EfficientNet-Lite0 on scikit-learn's digits with multirate training and every
  baseline; ``python -m multirate_optax.experiments.finetune``.
"""
