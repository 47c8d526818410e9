"""Data sets and pre-processing: 2-D toys, tabular, images, user files, dequantisation.

``load_dataset(name_or_path, seed)`` returns a :class:`Dataset` with train/val/test splits in
the original space and the pre-processing transform (standardisation or dequantisation +
logit) whose log-det makes NLLs exact in that space.
"""

from . import preprocessing, splits, toy
from .catalog import dataset_names, load_dataset, toy_dataset
from .dataset import Dataset, standardization_stats
from .files import file_dataset, read_table
from .images import IMAGES, image_dataset, load_mnist_subset
from .preprocessing import LogitPreprocess, UniformDequantization, bits_per_dim, dequantize
from .splits import Splits, split
from .tabular import TABULAR, tabular_dataset
from .toy import TOY, toy_splits

__all__ = [
    "IMAGES",
    "TABULAR",
    "TOY",
    "Dataset",
    "LogitPreprocess",
    "Splits",
    "UniformDequantization",
    "bits_per_dim",
    "dataset_names",
    "dequantize",
    "file_dataset",
    "image_dataset",
    "load_dataset",
    "load_mnist_subset",
    "preprocessing",
    "read_table",
    "split",
    "splits",
    "standardization_stats",
    "tabular_dataset",
    "toy",
    "toy_dataset",
    "toy_splits",
]
