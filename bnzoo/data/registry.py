"""The image datasets by name, for modules that take a dataset as a string (e.g. the sequence tasks)."""

from __future__ import annotations

from .base import ImageDataModule, InMemoryDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = ["IMAGE_DATAMODULES", "image_data_like", "image_datamodule_class", "list_datasets"]

IMAGE_DATAMODULES: dict[str, type[ImageDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "digits": DigitsDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
}


def list_datasets() -> list[str]:
    """The valid dataset names, sorted."""
    return sorted(IMAGE_DATAMODULES)


def image_datamodule_class(name: str) -> type[ImageDataModule]:
    """The image DataModule class registered as ``name``; a ValueError lists the valid names otherwise."""
    if not isinstance(name, str) or name not in IMAGE_DATAMODULES:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    return IMAGE_DATAMODULES[name]


def image_data_like(dataset: str, data: InMemoryDataModule) -> ImageDataModule:
    """The image DataModule of ``dataset`` with the loading options of ``data`` (directory, batch size, workers,
    validation split, seed, subset, normalization, download) and no augmentation: the source of DataModules that
    remake its batches (sequence tasks, class-grouped batches)."""
    return image_datamodule_class(dataset)(
        data_dir=str(data.data_dir), batch_size=data.batch_size, num_workers=data.num_workers,
        val_size=data.val_size, seed=data.seed, train_subset=data.train_subset, augment=False,
        normalization=data.normalization, download=data.download,
    )  # fmt: skip
