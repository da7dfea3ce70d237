"""Image datasets (built-in synthetic, CIFAR, ImageFolder) and batches cut on the device."""

from backbone.data.batching import BatchLoader, augment_batch
from backbone.data.datasets import DataConfig, ImageDataset, Splits, load_dataset, load_splits, make_synthetic, split_train_val

__all__ = [
    "BatchLoader",
    "DataConfig",
    "ImageDataset",
    "Splits",
    "augment_batch",
    "load_dataset",
    "load_splits",
    "make_synthetic",
    "split_train_val",
]
