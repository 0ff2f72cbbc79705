"""Data for the fine-tuning experiments: stratified splits, scikit-learn's digits, minibatches."""

from experiments.data.batches import shuffled_batches
from experiments.data.digits import (
    IMAGENET_MEAN, IMAGENET_STD, NUM_DIGIT_CLASSES, digits_to_images,
    load_digits_splits)
from experiments.data.splits import Dataset, Splits, stratified_splits

__all__ = (
    "Dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_DIGIT_CLASSES",
    "Splits",
    "digits_to_images",
    "load_digits_splits",
    "shuffled_batches",
    "stratified_splits",
)
