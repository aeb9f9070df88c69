"""Sequence classification tasks built from an image dataset, for the recurrent models.

* ``mode="pixel"``: one pixel per step, T = H * W steps of C features -- sequential MNIST (Le et al. 2015;
  Cooijmans et al. 2016, "Recurrent Batch Normalization", Sec. 5.1).
* ``mode="row"``: one image row per step, T = H steps of W * C features (channels interleaved per pixel).
* ``downsample=k``: each image first average-pooled over k x k blocks (kernel = stride = k), so H and W become
  H / k and W / k -- e.g. 28x28 to 14x14, a pixel sequence of 196 steps instead of 784, long sequences that fit
  a CPU. Pooling commutes with the per-channel normalization (an affine map), so the order does not matter.
* ``permute=True``: a fixed random permutation of the (downsampled) pixel positions, applied before the pixels
  are grouped into steps -- permuted sequential MNIST (the same permutation for every image and split, fixed by
  ``task_seed``).
* ``variable_length=True``: each sample keeps only its first L steps, L uniform in
  ``[min_length, max_length]`` and fixed per sample (by ``task_seed`` and the sample's position in its source
  file), so batches carry padding and lengths as speech batches do (Amodei et al. 2016).
* ``sortagrad=True``: the first training epoch in increasing order of length (:class:`SortaGradSampler`).

Batches are ``(x, lengths, y)``: x float (B, T, F) with T the longest length in the batch and every step at
or beyond a sample's length zero; lengths long (B,); y long (B,).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .base import ImageDataset
from .samplers import SortaGradSampler
from .transforms import Normalize
from .wrapped import WrappedImageDataModule

__all__ = ["SEQUENCE_MODES", "SequenceCollate", "SequenceDataModule", "SequenceDataset", "check_downsample"]

SEQUENCE_MODES = ("pixel", "row")


def check_downsample(downsample: int, image_size: int) -> int:
    """``downsample`` if it is a positive divisor of ``image_size``, else a ValueError naming the valid ones."""
    valid = [k for k in range(1, image_size + 1) if image_size % k == 0]
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample not in valid:
        raise ValueError(
            f"downsample must divide the image size {image_size}, got {downsample!r}; valid: "
            + ", ".join(map(str, valid))
        )
    return downsample


class SequenceDataset(Dataset):
    """An :class:`ImageDataset` with one sequence length per sample: items are ``(image, length, label)``."""

    def __init__(self, images: ImageDataset, lengths: Tensor) -> None:
        if lengths.shape != (len(images),):
            raise ValueError(f"need one length per image ({len(images)}), got shape {tuple(lengths.shape)}")
        self.images = images
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image, label = self.images[index]
        return image, self.lengths[index], label


class SequenceCollate:
    """``collate_fn`` turning ``(uint8 image, length, label)`` samples into a padded sequence batch.

    The batch is normalized as an image batch, average-pooled over ``downsample`` x ``downsample`` blocks (if
    above 1), its pixels are flattened in raster order (optionally permuted) and grouped ``pixels_per_step`` to
    a step, then cut to the longest length in the batch and zeroed beyond each sample's length.
    """

    def __init__(
        self, normalize: Normalize, pixels_per_step: int, permutation: Tensor | None = None, downsample: int = 1
    ) -> None:
        self.normalize = normalize
        self.pixels_per_step = pixels_per_step
        self.permutation = permutation
        self.downsample = downsample

    def __call__(self, samples: Sequence[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        images, lengths, labels = (torch.stack(field) for field in zip(*samples, strict=True))
        x = self.normalize(images)  # (B, C, H, W)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)  # (B, C, H / k, W / k)
        batch, channels = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, H * W, C): pixels in raster order
        if self.permutation is not None:
            x = x[:, self.permutation]
        x = x.reshape(batch, -1, self.pixels_per_step * channels)[:, : int(lengths.max())]
        padding = torch.arange(x.shape[1]) >= lengths[:, None]
        return x.masked_fill(padding[..., None], 0.0), lengths, labels


class SequenceDataModule(WrappedImageDataModule):
    """Sequence tasks over a named image dataset (see the module doc). Batches are ``(x, lengths, y)``.

    ``num_classes``, ``input_size`` (features per step) and ``max_length`` are set by ``__init__``, before
    :meth:`setup`, for linking to a model's arguments; ``permutation`` is the fixed pixel permutation (or
    None).

    Args:
        dataset: the image dataset, one of :func:`bnzoo.data.list_datasets`.
        mode: ``"pixel"`` (one pixel per step) or ``"row"`` (one row per step).
        downsample: average-pool the images over ``downsample`` x ``downsample`` blocks first (a divisor of the
            image size; 1: no pooling).
        permute: apply a fixed random permutation to the (downsampled) pixel positions.
        variable_length: cut each sample to a fixed random number of steps in ``[min_length, max_length]``.
        min_length: the shortest length (default: half of ``max_length``); used when ``variable_length``.
        sortagrad: iterate the first training epoch in increasing order of length (Deep Speech 2).
        task_seed: fixes the permutation and the lengths, i.e. the task; independent of ``seed``.
        data_dir, batch_size, num_workers, val_size, seed, train_subset, normalization, download: as for the
            image DataModules (:class:`bnzoo.data.ImageDataModule`); images are not augmented.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        mode: str = "pixel",
        downsample: int = 1,
        permute: bool = False,
        variable_length: bool = False,
        min_length: int | None = None,
        sortagrad: bool = False,
        task_seed: int = 0,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        train_subset: int | None = None,
        normalization: str = "dataset",
        download: bool = True,
    ) -> None:
        if mode not in SEQUENCE_MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(SEQUENCE_MODES)}")
        super().__init__(
            dataset, data_dir, batch_size, num_workers, val_size, seed, train_subset, normalization, download
        )
        self.save_hyperparameters(logger=False)  # logged by the task's logged_hparams()
        size, channels = self.image_size, self.in_chans
        del self.in_chans, self.image_size  # a sequence model is linked by input_size and max_length instead
        self.downsample = check_downsample(downsample, size)
        size //= downsample
        self.pixels_per_step = 1 if mode == "pixel" else size
        self.input_size: int = self.pixels_per_step * channels
        self.max_length: int = size * size // self.pixels_per_step
        self.min_length: int = max(1, self.max_length // 2) if min_length is None else min_length
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"min_length must be in [1, {self.max_length}] for {dataset!r} in {mode!r} mode, got {min_length}"
            )
        self.variable_length = variable_length
        self.sortagrad = sortagrad
        self.task_seed = task_seed
        self.permutation: Tensor | None = (
            torch.randperm(size * size, generator=torch.Generator().manual_seed(task_seed)) if permute else None
        )

    def wrap_split(self, split: str, images: ImageDataset) -> SequenceDataset:
        source = "test" if split == "test" else "train"  # the validation split is cut from the training file
        return SequenceDataset(images, self.sample_lengths(images, source))

    def sample_lengths(self, images: ImageDataset, source: str) -> Tensor:
        """Each sample's length: ``max_length``, or with ``variable_length`` a draw from
        ``[min_length, max_length]`` fixed by ``task_seed``, the source file (``"train"``/``"test"``) and the
        sample's position in it."""
        if not self.variable_length:
            return torch.full((len(images),), self.max_length, dtype=torch.long)
        rng = np.random.default_rng([self.task_seed, ("train", "test").index(source)])
        per_source = rng.integers(self.min_length, self.max_length, size=images.source_size, endpoint=True)
        return torch.from_numpy(per_source)[images.indices]

    def collate_fn(self, train: bool) -> SequenceCollate:
        return SequenceCollate(self.image_data.normalizer(), self.pixels_per_step, self.permutation, self.downsample)

    def train_sampler(self) -> Sampler | None:
        if not self.sortagrad:
            return super().train_sampler()
        distributed = dist.is_available() and dist.is_initialized()
        return SortaGradSampler(
            self.train_set.lengths,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            seed=self.seed,
        )
