"""The shared base of bnzoo's DataModules: in-memory datasets, a seeded train/val split, DataLoaders.

Every dataset bnzoo uses fits in memory (Fashion-MNIST: 55 MB of uint8 pixels, CIFAR: 184 MB), so the images
stay one ``uint8`` tensor and a batch is assembled, augmented and normalized by tensor ops in the
DataLoader's ``collate_fn`` (:mod:`bnzoo.data.transforms`). That is why ``num_workers=0`` is the default: a
batch of 128 costs about a millisecond in the main process (with CIFAR augmentation; less without), while
worker processes would compete with the model's compute threads for the same few CPU cores (raise
``num_workers`` when a GPU does the compute).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..checkpoint_io import SafeLoadFromCheckpoint
from .files import ImageFilesDataset, image_files
from .transforms import ImageCollate, Normalize

__all__ = [
    "NORMALIZATIONS",
    "ImageDataModule",
    "ImageDataset",
    "InMemoryDataModule",
    "channel_stats",
    "split_indices",
]

NORMALIZATIONS = ("dataset", "train", "none")
"""``normalization`` choices: the dataset's published per-channel mean/std constants, statistics computed from
the training split, or none (pixels scaled to [0, 1] only)."""


class ImageDataset(Dataset):
    """Images held in memory: ``images`` uint8 (N, C, H, W), ``labels`` long (N,).

    ``indices`` are the samples' positions in their source file (the official train or test set, of
    ``source_size`` samples), so a per-sample property such as a sequence length can be tied to the sample
    itself, whatever split or subset it ends up in.
    """

    def __init__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None, source_size: int | None = None):
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self.source_size = len(labels) if source_size is None else source_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, indices: Tensor) -> ImageDataset:
        """The samples at ``indices`` (positions in this dataset), as a new in-memory dataset."""
        return ImageDataset(self.images[indices], self.labels[indices], self.indices[indices], self.source_size)


def split_indices(num_samples: int, val_size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """A random train/val split of ``range(num_samples)``, fixed by ``seed``.

    ``val_size`` is a count (int) or a fraction (float in [0, 1)). The train indices come back in the seeded
    random order (so their first N are a seeded random subset); the val indices sorted.
    """
    num_val = round(val_size * num_samples) if isinstance(val_size, float) else val_size
    if not 0 <= num_val < num_samples:
        raise ValueError(f"val_size={val_size!r} leaves no training data out of {num_samples} samples")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[num_val:], order[:num_val].sort().values


def channel_stats(images: Tensor, pixel_max: float = 255.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population standard deviation of uint8 images (N, C, H, W), in units of
    ``pixel_max``.

    Exact and light on memory: from a histogram of the 256 byte values per channel, summed in float64.
    """
    values = torch.arange(256, dtype=torch.float64) / pixel_max
    means, stds = [], []
    for channel in images.unbind(1):
        counts = torch.bincount(channel.reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)


def _check_count(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {kind}, got {value!r}")


class InMemoryDataModule(SafeLoadFromCheckpoint, L.LightningDataModule):
    """What every bnzoo DataModule shares: the common arguments, their checks, and the four DataLoaders.

    Subclasses fill ``train_set``, ``val_set``, ``test_set`` in :meth:`setup` and say how to collate a batch
    (:meth:`collate_fn`) and, optionally, how to order the training samples (:meth:`train_sampler`).
    The last incomplete training batch is dropped (a batch of one has no batch statistics, and a small last
    batch gives noisy ones); evaluation loaders keep every sample, in order. ``pin_memory`` is on only when
    CUDA is available; ``persistent_workers`` whenever there are workers.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        train_subset: int | None = None,
        normalization: str = "dataset",
        download: bool = True,
    ) -> None:
        super().__init__()
        _check_count("batch_size", batch_size)
        _check_count("num_workers", num_workers, minimum=0)
        _check_count("train_subset", train_subset, allow_none=True)
        if isinstance(val_size, bool) or not (
            (isinstance(val_size, int) and val_size >= 0) or (isinstance(val_size, float) and 0.0 <= val_size < 1.0)
        ):
            raise ValueError(f"val_size must be a count (int >= 0) or a fraction (float in [0, 1)), got {val_size!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.train_subset = train_subset
        self.normalization = normalization
        self.download = download
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    SPLITS = ("train", "val", "test")

    def splits(self) -> dict[str, Dataset | None]:
        """``{"train": ..., "val": ..., "test": ...}``: the datasets :meth:`setup` made (None before)."""
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}

    def set_split(self, split: str, dataset: Dataset) -> None:
        """Set the dataset of ``split`` (one of :attr:`SPLITS`)."""
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.SPLITS)}")
        setattr(self, f"{split}_set", dataset)

    # -- what subclasses provide ---------------------------------------------------------------------------
    def collate_fn(self, train: bool) -> Callable[[list[Any]], Any]:
        """The ``collate_fn`` of the training (``train=True``) or evaluation DataLoaders."""
        raise NotImplementedError

    def train_sampler(self) -> Sampler | None:
        """The training sampler: a shuffle seeded by ``seed + epoch`` (torch's DistributedSampler, sharded over
        the processes under DDP, which Lightning keeps and advances with ``set_epoch``). The order of every
        epoch depends only on the seed, so a run resumed from a checkpoint sees the same batches as an
        uninterrupted one."""
        distributed = dist.is_available() and dist.is_initialized()
        return DistributedSampler(
            self.train_set,  # type: ignore[arg-type]
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=self.seed,
        )

    def train_batch_sampler(self) -> Sampler[list[int]] | None:
        """A sampler of whole training batches, for modules whose batches follow a rule (e.g. a few classes
        per batch); it replaces :meth:`train_sampler` and ``batch_size``. None (the default): plain batches."""
        return None

    # -- DataLoaders ---------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset | None, stage: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup({stage!r}) before asking for its DataLoader")
        common = {
            "num_workers": self.num_workers,
            "collate_fn": self.collate_fn(train),
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }
        batch_sampler = self.train_batch_sampler() if train else None
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **common)
        sampler = self.train_sampler() if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            **common,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is not None and len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the training split has {len(self.train_set)} samples, fewer than "
                f"batch_size={self.batch_size} "
                "(the last incomplete training batch is dropped); lower batch_size or raise train_subset"
            )
        return self._loader(self.train_set, "fit", train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation split; an empty list (Lightning then skips validation) when ``val_size=0``."""
        if self.val_set is not None and len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, "validate")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        """The test set, in order (for ``bnzoo predict``)."""
        return self._loader(self.test_set, "predict")


class ImageDataModule(InMemoryDataModule):
    """Base of the image DataModules. Batches are ``(x, y)``: x float (B, C, H, W), y long (B,).

    A subclass sets the class attributes below and implements :meth:`load_split` (and :meth:`prepare_data` if
    the data must be fetched). ``num_classes``, ``in_chans`` and ``image_size`` are class attributes, readable
    before :meth:`setup`, for linking to a model's arguments.

    Args:
        data_dir: where the dataset's files are looked for and downloaded to.
        batch_size: samples per batch (training, validation and test).
        num_workers: DataLoader worker processes (0: assemble batches in the main process; see module doc).
        val_size: validation samples taken from the training set: a count (int) or a fraction (float).
        seed: fixes the train/val split and ``train_subset``.
        train_subset: keep only this many training samples (a seeded random subset), for quick runs.
        augment: training-time augmentation, where the dataset defines one (``crop_padding``, ``hflip``).
        crop_padding, hflip: override the dataset's augmentation when ``augment`` (None: the dataset's own):
            ``crop_padding=0`` with ``hflip=True`` keeps only the flips -- the lighter augmentation of a short run.
        normalization: ``"dataset"`` (the class's ``mean``/``std``), ``"train"`` (computed from the training
            split) or ``"none"`` (pixels scaled to [0, 1]).
        download: fetch missing files in :meth:`prepare_data` (with torchvision's download code).
        path: image files to predict (a file, a folder or a list; :mod:`bnzoo.data.files`) instead of the test split,
            normalized as in training (the statistics are in the checkpoint: :meth:`state_dict`).
    """

    num_classes: ClassVar[int]
    in_chans: ClassVar[int]
    image_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    pixel_max: ClassVar[float] = 255.0
    crop_padding: ClassVar[int] = 0  # random-crop padding of the training augmentation (0: no crop)
    hflip: ClassVar[bool] = False  # random horizontal flips in the training augmentation

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        train_subset: int | None = None,
        augment: bool = False,
        normalization: str = "dataset",
        download: bool = True,
        crop_padding: int | None = None,
        hflip: bool | None = None,
        path: str | list[str] | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_size, seed, train_subset, normalization, download)
        _check_count("crop_padding", crop_padding, minimum=0, allow_none=True)
        if hflip is not None and not isinstance(hflip, bool):
            raise ValueError(f"hflip must be true, false or null (the dataset's own), got {hflip!r}")
        self.path = path
        self.predict_set: ImageFilesDataset | None = None
        self.save_hyperparameters(logger=False)  # logged by the task's logged_hparams()
        self.augment = augment
        self.crop_padding = self.crop_padding if crop_padding is None else crop_padding  # over the class's default
        self.hflip = self.hflip if hflip is None else hflip
        self._train_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """The official training (``train=True``) or test set in file order: uint8 (N, C, H, W), long (N,)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download what is missing (on rank 0 only under Lightning). Bundled datasets need nothing."""

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs: ``fit``/``validate``: train and val; ``test``/``predict``: test, or for
        ``predict`` with ``path``, those files."""
        if stage == "predict" and self.path is not None:
            if self.predict_set is None:
                self.predict_set = ImageFilesDataset(image_files(self.path), self.in_chans, self.image_size)
            return
        if self.train_set is None and stage in (None, "fit", "validate"):
            self._setup_train()
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = ImageDataset(*self._checked_split(train=False))

    def _setup_train(self) -> None:
        source = ImageDataset(*self._checked_split(train=True))
        train_idx, val_idx = split_indices(len(source), self.val_size, self.seed)
        if self.train_subset is not None:
            if self.train_subset > len(train_idx):
                raise ValueError(f"train_subset={self.train_subset} but the split has {len(train_idx)} samples")
            train_idx = train_idx[: self.train_subset]
        self.train_set, self.val_set = source.subset(train_idx), source.subset(val_idx)

    def _checked_split(self, train: bool) -> tuple[Tensor, Tensor]:
        images, labels = self.load_split(train)
        split = "training" if train else "test"
        expected = (self.in_chans, self.image_size, self.image_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__}: {split} images are {images.dtype} {tuple(images.shape)}, "
                f"expected uint8 (N, {', '.join(map(str, expected))})"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: {split} labels span [{int(labels.min())}, "
                f"{int(labels.max())}], expected [0, {self.num_classes - 1}]"
            )
        return images, labels.long()

    def normalizer(self) -> Normalize:
        """The per-channel normalization that ``normalization`` selects (``"train"`` needs :meth:`setup`)."""
        if self.normalization == "none":
            mean, std = (0.0,) * self.in_chans, (1.0,) * self.in_chans
        elif self.normalization == "dataset":
            mean, std = self.mean, self.std
        else:
            if self._train_stats is None:  # neither computed nor restored from a checkpoint (load_state_dict)
                if self.train_set is None:
                    self._setup_train()
                self._train_stats = channel_stats(self.train_set.images, self.pixel_max)
            mean, std = self._train_stats
        return Normalize(mean, std, self.pixel_max)

    def state_dict(self) -> dict[str, Any]:
        """The normalization's per-channel ``mean`` and ``std`` (saved in every checkpoint by Lightning), so that a
        run restored from it -- ``bnzoo predict --data.path`` on the user's files -- normalizes as training did
        without reading the training split."""
        if self.normalization == "train" and self._train_stats is None and self.train_set is None:
            return {}
        normalize = self.normalizer()
        return {"normalization": self.normalization, "mean": list(normalize.mean), "std": list(normalize.std)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("normalization") == "train" == self.normalization:
            self._train_stats = (tuple(state_dict["mean"]), tuple(state_dict["std"]))

    def predict_dataloader(self) -> DataLoader:
        """The files of ``path``, in order (8-bit files: values in units of 255, whatever the dataset's
        ``pixel_max``), or else the test split."""
        if self.path is None or self.predict_set is None:
            return super().predict_dataloader() if self.path is None else self._loader(None, "predict")
        collate = ImageCollate(Normalize(self.normalizer().mean, self.normalizer().std, 255.0))
        workers = self.num_workers
        return DataLoader(self.predict_set, batch_size=self.batch_size, num_workers=workers, collate_fn=collate)

    def collate_fn(self, train: bool) -> ImageCollate:
        augment = train and self.augment
        return ImageCollate(self.normalizer(), self.crop_padding if augment else 0, augment and self.hflip)
