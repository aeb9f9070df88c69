"""The image datasets by name, for modules that take a dataset as a string (e.g. the sequence tasks)."""

from __future__ import annotations

from .base import ImageDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = ["IMAGE_DATAMODULES", "image_datamodule_class", "list_datasets"]

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
