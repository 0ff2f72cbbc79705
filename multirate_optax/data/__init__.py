"""Data for the fine-tuning experiments: scikit-learn's digits, and minibatches."""

from multirate_optax.data.batches import shuffled_batches
from multirate_optax.data.digits import (
    IMAGENET_MEAN, IMAGENET_STD, NUM_DIGIT_CLASSES, Dataset, DigitsSplits,
    digits_to_images, load_digits_splits)

__all__ = (
    "Dataset",
    "DigitsSplits",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_DIGIT_CLASSES",
    "digits_to_images",
    "load_digits_splits",
    "shuffled_batches",
)
