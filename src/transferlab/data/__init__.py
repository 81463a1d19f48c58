"""LightningDataModules: one shared base (splits, subsets, checks, fingerprint, input paths) and one module per
dataset; any of them can be the source or the target."""

from transferlab.data.base import ClassificationDataModule
from transferlab.data.builtin import BuiltinDataModule
from transferlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from transferlab.data.cifar_shifted import ShiftedCIFAR10DataModule
from transferlab.data.image_folder import ImageFolderDataModule
from transferlab.data.imagenet import ImageNetDataModule
from transferlab.data.imagenet_downsampled import DownsampledImageNetDataModule

__all__ = [
    "ClassificationDataModule",
    "BuiltinDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ShiftedCIFAR10DataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "DownsampledImageNetDataModule",
]
