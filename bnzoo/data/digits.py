"""scikit-learn's bundled 8x8 digits: the fastest real dataset, for smoke tests and quick experiments."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import ImageDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ImageDataModule):
    """The 1797 8x8 grayscale digits of ``sklearn.datasets.load_digits`` (the test part of the UCI "Optical
    Recognition of Handwritten Digits" set), pixel values 0..16. Bundled with scikit-learn: no files, no
    download (``data_dir`` and ``download`` are accepted for a uniform interface and unused).

    The data has no official split: a fixed random ``test_size`` = 360 images (20%, chosen with seed 0,
    independent of ``seed``) are the test set, so every run tests on the same images; the other 1437 are the
    training set that ``val_size``/``seed`` split further.

    ``mean``/``std``: pixel mean and population standard deviation over all 1797 images, pixels divided by 16
    (0.30526 and 0.37605). Augmentation (``augment=True``): random crop with 1 pixel of padding, no flips.
    """

    test_size: ClassVar[int] = 360
    num_classes = 10
    in_chans = 1
    image_size = 8
    pixel_max = 16.0
    mean = (0.3053,)
    std = (0.3760,)
    crop_padding = 1

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        index = (order[self.test_size :] if train else order[: self.test_size]).sort().values
        return images[index], labels[index]
