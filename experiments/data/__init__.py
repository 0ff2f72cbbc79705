"""Data for the fine-tuning experiments: stratified splits, scikit-learn's
digits, labelled texts (Rotten Tomatoes, your CSV), minibatches, length buckets."""

from experiments.data.batches import LengthBuckets, shuffled_batches
from experiments.data.digits import (
    IMAGENET_MEAN, IMAGENET_STD, NUM_DIGIT_CLASSES, digits_to_images,
    load_digits_splits)
from experiments.data.splits import (
    Dataset, Splits, stratified_split_indices, stratified_splits,
    stratified_subset)
from experiments.data.texts import (
    ROTTEN_TOMATOES_CLASSES, LabelledTexts, TextSplits, labelled_texts,
    load_labelled_csv, load_rotten_tomatoes, rotten_tomatoes_path,
    split_texts)

__all__ = (
    "Dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LabelledTexts",
    "LengthBuckets",
    "NUM_DIGIT_CLASSES",
    "ROTTEN_TOMATOES_CLASSES",
    "Splits",
    "TextSplits",
    "digits_to_images",
    "labelled_texts",
    "load_digits_splits",
    "load_labelled_csv",
    "load_rotten_tomatoes",
    "rotten_tomatoes_path",
    "shuffled_batches",
    "split_texts",
    "stratified_split_indices",
    "stratified_splits",
    "stratified_subset",
)
