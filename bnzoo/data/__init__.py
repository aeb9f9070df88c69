"""LightningDataModules for bnzoo: in-memory image datasets and sequence tasks built on them.

>>> from bnzoo.data import DigitsDataModule, SequenceDataModule
>>> dm = DigitsDataModule(batch_size=32)
>>> dm.num_classes, dm.in_chans, dm.image_size
(10, 1, 8)
>>> SequenceDataModule("digits", mode="row").input_size
8

Image batches are ``(x, y)``: x float (B, C, H, W), y long (B,). Sequence batches are ``(x, lengths, y)``:
x float (B, T, F) zero-padded, lengths long (B,), y long (B,).
"""

from .base import (
    NORMALIZATIONS,
    ImageDataModule,
    ImageDataset,
    InMemoryDataModule,
    channel_stats,
    split_indices,
)
from .cifar import CIFAR10DataModule, CIFAR100DataModule, CifarDataModule, load_cifar_batch
from .digits import DigitsDataModule
from .idx import read_idx
from .mnist import FashionMNISTDataModule, IdxDataModule, MNISTDataModule
from .registry import IMAGE_DATAMODULES, image_data_like, image_datamodule_class, list_datasets
from .samplers import SortaGradSampler
from .sequence import SEQUENCE_MODES, SequenceCollate, SequenceDataModule, SequenceDataset
from .transforms import ImageCollate, Normalize, random_crop_flip
from .wrapped import WrappedImageDataModule

__all__ = [
    "WrappedImageDataModule",
    "IMAGE_DATAMODULES",
    "NORMALIZATIONS",
    "SEQUENCE_MODES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CifarDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IdxDataModule",
    "ImageCollate",
    "ImageDataModule",
    "ImageDataset",
    "InMemoryDataModule",
    "MNISTDataModule",
    "Normalize",
    "SequenceCollate",
    "SequenceDataModule",
    "SequenceDataset",
    "SortaGradSampler",
    "channel_stats",
    "image_data_like",
    "image_datamodule_class",
    "list_datasets",
    "load_cifar_batch",
    "random_crop_flip",
    "read_idx",
    "split_indices",
]
