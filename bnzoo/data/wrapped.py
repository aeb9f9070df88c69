"""A DataModule over a named image dataset that changes how its batches are made: the one place the wrapped
image DataModule is built (:func:`bnzoo.data.registry.image_data_like`) and its splits taken over. The sequence
tasks (:class:`bnzoo.data.SequenceDataModule`) and the claims lab's batch makers derive from it."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .base import ImageDataset, InMemoryDataModule
from .registry import image_data_like

__all__ = ["WrappedImageDataModule"]


class WrappedImageDataModule(InMemoryDataModule):
    """A DataModule over the image dataset named ``dataset`` (its splits, normalization and collate), for
    subclasses that change how its batches are made. ``num_classes``, ``in_chans`` and ``image_size`` are set by
    ``__init__`` for linking to a model. The other arguments are those of :class:`bnzoo.data.ImageDataModule`
    (without augmentation)."""

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        train_subset: int | None = None,
        normalization: str = "dataset",
        download: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_size, seed, train_subset, normalization, download)
        self.image_data = image_data_like(dataset, self)
        self.num_classes: int = self.image_data.num_classes
        self.in_chans: int = self.image_data.in_chans
        self.image_size: int = self.image_data.image_size

    def prepare_data(self) -> None:
        self.image_data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.image_data.setup(stage)
        for split, images in self.image_data.splits().items():
            if images is not None and self.splits()[split] is None:
                self.set_split(split, self.wrap_split(split, images))

    def wrap_split(self, split: str, images: ImageDataset) -> Dataset:
        """The dataset of ``split`` ("train", "val", "test") made from the image dataset's (default: itself)."""
        return images

    def collate_fn(self, train: bool) -> Any:
        return self.image_data.collate_fn(train)

    def state_dict(self) -> dict[str, Any]:
        """The image dataset's normalization statistics (:meth:`bnzoo.data.ImageDataModule.state_dict`)."""
        return self.image_data.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.image_data.load_state_dict(state_dict)
