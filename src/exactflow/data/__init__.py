"""Data sets and pre-processing: 2-D toys, tabular, images, user files, dequantisation."""

from . import splits, toy
from .splits import Splits, split
from .toy import TOY, toy_splits

__all__ = ["TOY", "Splits", "split", "splits", "toy", "toy_splits"]
