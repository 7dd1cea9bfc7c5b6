"""Data sets as tensors in memory, and the loader that batches and augments them."""

from ddgpipe.data.catalog import DATASET_NAMES, load_dataset
from ddgpipe.data.dataset import Dataset
from ddgpipe.data.loader import BatchLoader, random_crop_flip

__all__ = ["DATASET_NAMES", "Dataset", "load_dataset", "BatchLoader", "random_crop_flip"]
