"""Data for the claims experiments: non-i.i.d. class-grouped batches (C8) and features of wildly different
scales (C13), over any of bnzoo's image datasets by name.

Both DataModules wrap a named image DataModule (:func:`bnzoo.data.image_data_like`) and change one thing:

* :class:`ClassGroupedDataModule` -- every training batch holds ``classes_per_batch`` classes with
  ``batch_size / classes_per_batch`` images each (Ioffe 2017, Sec. 4: "non-i.i.d. minibatches", which there were
  16 classes x 2 images out of ImageNet's 1000). Validation and test batches stay i.i.d.
* :class:`RescaledFeaturesDataModule` -- every input feature (pixel) is multiplied by its own fixed factor
  ``10**u``, ``u ~ U(-log10_range, log10_range)``; with ``standardize=True`` each feature is then standardized with
  the training split's per-feature mean and standard deviation (the "data preparation" that input BN replaces).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from bnzoo.data.transforms import ImageCollate
from bnzoo.data.wrapped import WrappedImageDataModule

__all__ = [
    "ClassGroupedBatchSampler",
    "check_grouping",
    "ClassGroupedDataModule",
    "RescaledCollate",
    "RescaledFeaturesDataModule",
    "WrappedImageDataModule",
]


class _Epoch:
    """The epoch a sampler is in; Lightning calls ``set_epoch`` on a batch sampler's ``sampler`` attribute."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def check_grouping(batch_size: int, classes_per_batch: Any, num_classes: int) -> None:
    """A ValueError naming the bad value unless ``batch_size`` splits into ``classes_per_batch`` equal parts of
    distinct classes out of ``num_classes``."""
    if isinstance(classes_per_batch, bool) or not isinstance(classes_per_batch, int) or classes_per_batch < 1:
        raise ValueError(f"classes_per_batch must be a positive int, got {classes_per_batch!r}")
    if classes_per_batch > num_classes:
        raise ValueError(f"classes_per_batch={classes_per_batch} but the data has only {num_classes} classes")
    if batch_size % classes_per_batch:
        raise ValueError(f"batch_size={batch_size} is not a multiple of classes_per_batch={classes_per_batch}")


class ClassGroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` distinct classes, ``batch_size // classes_per_batch`` samples of each.

    Each epoch (seeded by ``seed + epoch``), every class's samples are shuffled and cut into chunks of
    ``batch_size // classes_per_batch`` (a class's last incomplete chunk is dropped); a batch then takes one chunk
    from each of ``classes_per_batch`` distinct classes drawn with probability proportional to their remaining
    chunks, until fewer than ``classes_per_batch`` classes have chunks left.
    """

    def __init__(self, labels: Sequence[int] | Tensor, batch_size: int, classes_per_batch: int, seed: int = 0) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        check_grouping(batch_size, classes_per_batch, int(self.labels.unique().numel()))
        self.batch_size, self.classes_per_batch, self.seed = batch_size, classes_per_batch, seed
        self.sampler = _Epoch()
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (lists of dataset indices)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        per_class = self.batch_size // self.classes_per_batch
        chunks: dict[int, list[list[int]]] = {}
        for label in self.labels.unique().tolist():
            members = torch.nonzero(self.labels == label).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            usable = len(members) // per_class * per_class
            if usable:
                chunks[label] = members[:usable].view(-1, per_class).tolist()
        batches = []
        while len(chunks) >= self.classes_per_batch:
            classes = list(chunks)
            weights = torch.tensor([len(chunks[c]) for c in classes], dtype=torch.float64)
            chosen = torch.multinomial(weights, self.classes_per_batch, replacement=False, generator=generator)
            batch = []
            for index in chosen.tolist():
                label = classes[index]
                batch += chunks[label].pop()
                if not chunks[label]:
                    del chunks[label]
            batches.append(batch)
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.sampler.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.sampler.epoch))


class ClassGroupedDataModule(WrappedImageDataModule):
    """Training batches of ``classes_per_batch`` classes each (:class:`ClassGroupedBatchSampler`); i.i.d.
    validation and test batches. The other arguments are those of :class:`WrappedImageDataModule`."""

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        classes_per_batch: int = 2,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        train_subset: int | None = None,
        normalization: str = "dataset",
        download: bool = True,
    ) -> None:
        super().__init__(
            dataset, data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_size=val_size, seed=seed,
            train_subset=train_subset, normalization=normalization, download=download,
        )  # fmt: skip
        self.save_hyperparameters(logger=False)  # logged by the task's logged_hparams()
        check_grouping(batch_size, classes_per_batch, self.num_classes)
        self.classes_per_batch = classes_per_batch

    def train_batch_sampler(self) -> ClassGroupedBatchSampler:
        return ClassGroupedBatchSampler(self.train_set.labels, self.batch_size, self.classes_per_batch, self.seed)


class RescaledCollate:
    """An image collate whose output features are multiplied by ``scales`` (C, H, W), then optionally
    standardized: ``(x * scales - mean) / std`` with per-feature ``mean`` and ``std``."""

    def __init__(self, collate: ImageCollate, scales: Tensor, mean: Tensor | None = None, std: Tensor | None = None):
        self.collate, self.scales, self.mean, self.std = collate, scales, mean, std

    def __call__(self, samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x, y = self.collate(samples)
        x = x * self.scales
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x, y


class RescaledFeaturesDataModule(WrappedImageDataModule):
    """Inputs whose features have wildly different scales (claim C13), optionally standardized.

    Args:
        dataset: the image dataset, one of :func:`bnzoo.data.list_datasets`.
        log10_range: each feature (pixel) is multiplied by ``10**u`` with ``u ~ U(-log10_range, log10_range)``,
            fixed by ``scale_seed`` (after the dataset's usual normalization).
        scale_seed: fixes the factors, i.e. the task; independent of ``seed``.
        standardize: standardize every feature with its mean and standard deviation over the training split
            (features that are constant there are only centred).
        data_dir, batch_size, num_workers, val_size, seed, train_subset, normalization, download: see
            :class:`WrappedImageDataModule`.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        log10_range: float = 2.0,
        scale_seed: int = 0,
        standardize: bool = False,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        train_subset: int | None = None,
        normalization: str = "dataset",
        download: bool = True,
    ) -> None:
        super().__init__(
            dataset, data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_size=val_size, seed=seed,
            train_subset=train_subset, normalization=normalization, download=download,
        )  # fmt: skip
        self.save_hyperparameters(logger=False)  # logged by the task's logged_hparams()
        if isinstance(log10_range, bool) or not isinstance(log10_range, (int, float)) or log10_range < 0:
            raise ValueError(f"log10_range must be a number >= 0, got {log10_range!r}")
        shape = (self.in_chans, self.image_size, self.image_size)
        u = torch.rand(shape, generator=torch.Generator().manual_seed(scale_seed), dtype=torch.float64)
        self.scales = (10.0 ** ((2 * u - 1) * log10_range)).float()
        self.standardize = standardize
        self._moments: tuple[Tensor, Tensor] | None = None

    def feature_moments(self) -> tuple[Tensor, Tensor]:
        """Per-feature mean and standard deviation of the rescaled training split (float64 sums)."""
        if self._moments is None:
            if self.train_set is None:
                raise RuntimeError(f"{type(self).__name__}: standardize=True needs setup() first")
            x = self.image_data.normalizer()(self.train_set.images).double() * self.scales.double()
            std = x.std(0, unbiased=False)
            self._moments = (x.mean(0).float(), torch.where(std > 0, std, torch.ones_like(std)).float())
        return self._moments

    def collate_fn(self, train: bool) -> RescaledCollate:
        mean, std = self.feature_moments() if self.standardize else (None, None)
        return RescaledCollate(self.image_data.collate_fn(train), self.scales, mean, std)
