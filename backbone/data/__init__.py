"""Image datasets (built-in synthetic, CIFAR, ImageFolder), batches cut on the device, and image
trees too large for memory streamed from disk (``backbone.data.streaming``)."""

from backbone.data.batching import BatchLoader, augment_batch
from backbone.data.datasets import DataConfig, ImageDataset, Splits, load_dataset, load_splits, make_synthetic, split_train_val
from backbone.data.streaming import BatchSource, ImageFiles, StreamingLoader, make_loader, scan_imagefolder

__all__ = [
    "BatchLoader",
    "BatchSource",
    "DataConfig",
    "ImageDataset",
    "ImageFiles",
    "Splits",
    "StreamingLoader",
    "augment_batch",
    "load_dataset",
    "load_splits",
    "make_loader",
    "make_synthetic",
    "scan_imagefolder",
    "split_train_val",
]
