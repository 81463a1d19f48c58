"""LightningDataModules: one shared base (splits, subsets, input paths) and one module per dataset."""

from transferlab.data.base import ClassificationDataModule
from transferlab.data.builtin import BuiltinDataModule
from transferlab.data.cifar10 import CIFAR10DataModule
from transferlab.data.imagenet import ImageNetDataModule
from transferlab.data.imagenet_downsampled import DownsampledImageNetDataModule

__all__ = ["ClassificationDataModule", "BuiltinDataModule", "CIFAR10DataModule", "ImageNetDataModule",
           "DownsampledImageNetDataModule"]
