"""The user's own image files as a prediction set: ``bnzoo predict ... --data.path image.png`` (or a folder, or a
list of both) classifies them with a trained model.

Each file is read with PIL, converted to the model's input -- grayscale (``L``) for one channel, ``RGB`` for
three --, resized to ``image_size`` x ``image_size`` (bilinear, with PIL's antialiasing when shrinking) and kept
as ``uint8`` (C, H, W), so the data module's own collate normalizes it exactly as it normalized its training
images (the same ``Normalize``, with the statistics stored in the checkpoint; :mod:`bnzoo.data.base`). Labels are
unknown: -1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IMAGE_SUFFIXES", "ImageFilesDataset", "image_files", "load_image"]

#: the file name endings a folder is searched for (a file given by name is read whatever its ending)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")

#: PIL's mode for a model's input channels
_MODES = {1: "L", 3: "RGB"}


def image_files(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The image files of ``path``: a file, a folder (its files ending in :data:`IMAGE_SUFFIXES`, sorted by name,
    not recursive), or a list of files and folders, in order. A missing path or a folder without images is a
    ValueError naming it."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("--data.path: no file or folder given")
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"--data.path {entry}: the folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise ValueError(f"--data.path {entry}: no such file or folder")
    return files


def load_image(path: str | os.PathLike[str], in_chans: int, image_size: int) -> Tensor:
    """One image file as the model's input: ``uint8`` (in_chans, image_size, image_size)."""
    from PIL import Image, UnidentifiedImageError

    if in_chans not in _MODES:
        raise ValueError(f"image files can be read for 1 or 3 input channels, not in_chans={in_chans}")
    try:
        with Image.open(path) as image:
            image = image.convert(_MODES[in_chans])
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--data.path {path}: not an image PIL can read ({err})") from err
    return data.view(image_size, image_size, in_chans).permute(2, 0, 1).contiguous()


class ImageFilesDataset(Dataset):
    """Image files held in memory as the model's input (see the module doc): ``images`` uint8 (N, C, H, W),
    ``labels`` -1 (unknown), ``paths`` in the dataset's order; samples are ``(image, label)`` like
    :class:`~bnzoo.data.ImageDataset`'s."""

    def __init__(self, paths: Sequence[Path], in_chans: int, image_size: int) -> None:
        self.paths = [str(p) for p in paths]
        self.images = torch.stack([load_image(p, in_chans, image_size) for p in paths])
        self.labels = torch.full((len(self.paths),), -1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]
