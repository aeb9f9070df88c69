"""MNIST and Fashion-MNIST DataModules, read from the IDX files (plain or ``.gz``).

Files are looked for in ``<data_dir>/<MNIST|FashionMNIST>/raw/`` (torchvision's layout, so a copy torchvision
downloaded is reused), then in system directories (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist/``,
where Debian's ``dataset-fashion-mnist`` installs it). If none has all four files and ``download=True``,
:meth:`prepare_data` runs torchvision's own download (its mirrors, its md5 checks) into ``data_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torchvision.datasets as tvd
from torch import Tensor

from .base import ImageDataModule
from .idx import read_idx

__all__ = ["FashionMNISTDataModule", "IdxDataModule", "MNISTDataModule"]


class IdxDataModule(ImageDataModule):
    """Base of the 28x28 grayscale datasets in the IDX format of MNIST.

    Augmentation (``augment=True``): random crop with ``crop_padding`` pixels of zero padding, plus horizontal
    flips where ``hflip`` (Fashion-MNIST's garments, not digits). The MNIST literature mostly trains without
    augmentation (e.g. Ioffe & Szegedy 2015, Sec. 4.1), so the default is ``augment=False``.
    """

    torchvision_class: ClassVar[type[tvd.MNIST]]
    """The torchvision dataset whose download code, mirrors and md5s are used, and whose folder name is the
    layout under ``data_dir``."""
    system_dirs: ClassVar[tuple[str, ...]] = ()
    """Directories searched after ``data_dir`` (e.g. where a distribution package installs the files)."""
    system_hint: ClassVar[str] = ""

    num_classes = 10
    in_chans = 1
    image_size = 28
    crop_padding = 2

    @staticmethod
    def file_names(train: bool) -> tuple[str, str]:
        """The images and labels file names, without ``.gz``."""
        prefix = "train" if train else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    @property
    def raw_dir(self) -> Path:
        """torchvision's layout: ``<data_dir>/<ClassName>/raw``."""
        return self.data_dir / self.torchvision_class.__name__ / "raw"

    def search_dirs(self) -> list[Path]:
        return [self.raw_dir, *map(Path, self.system_dirs)]

    def find_dir(self) -> Path | None:
        """The first search directory holding all four files (each plain or ``.gz``), or ``None``."""
        names = self.file_names(True) + self.file_names(False)
        for directory in self.search_dirs():
            if all(_existing(directory / name) for name in names):
                return directory
        return None

    def how_to_get(self) -> str:
        mirrors = ", ".join(self.torchvision_class.mirrors)
        options = [self.system_hint] if self.system_hint else []
        options += [
            f"put the four *-idx?-ubyte[.gz] files into {self.raw_dir}/",
            f"or pass download=True to fetch them with torchvision from {mirrors}",
        ]
        return "To get the data: " + "; ".join(options) + "."

    def prepare_data(self) -> None:
        if not self.download or self.find_dir() is not None:
            return
        try:
            self.torchvision_class(str(self.data_dir), train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise RuntimeError(
                f"downloading {self.torchvision_class.__name__} into {self.raw_dir} failed: {err}\n{self.how_to_get()}"
            ) from err

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        directory = self.find_dir()
        if directory is None:
            searched = ", ".join(str(d) for d in self.search_dirs())
            hint = " (download=True downloads in prepare_data(), which runs before setup())" if self.download else ""
            raise FileNotFoundError(
                f"{self.torchvision_class.__name__} files not found; searched {searched}{hint}. {self.how_to_get()}"
            )
        images_path, labels_path = (_existing(directory / name) for name in self.file_names(train))
        images, labels = self._read(images_path, 3), self._read(labels_path, 1)
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels. "
                f"{self.how_to_get()}"
            )
        return images.unsqueeze(1), labels.long()

    def _read(self, path: Path, ndim: int) -> Tensor:
        try:
            return read_idx(path, ndim)
        except ValueError as err:
            raise ValueError(f"corrupt data file: {err}. Delete it and get it again. {self.how_to_get()}") from err


def _existing(path: Path) -> Path | None:
    """``path`` if it is a file, else ``path.gz`` if that is, else ``None`` (an uncompressed copy wins)."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


class FashionMNISTDataModule(IdxDataModule):
    """Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): 60000 training and 10000 test 28x28 grayscale
    images of 10 garment classes. Works offline with Debian's ``dataset-fashion-mnist`` package.

    ``mean``/``std``: the pixel mean and population standard deviation of the 60000 training images
    (0.28604 and 0.35302, computed here from the Debian files with pixels scaled to [0, 1]; the commonly
    quoted values).
    """

    torchvision_class = tvd.FashionMNIST
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    system_hint = (
        "install Debian's copy with `apt-get install dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist/)"
    )
    mean = (0.2860,)
    std = (0.3530,)
    hflip = True


class MNISTDataModule(IdxDataModule):
    """MNIST (LeCun et al. 1998): 60000 training and 10000 test 28x28 grayscale handwritten digits.

    ``mean``/``std``: 0.1307 and 0.3081, the training-set pixel statistics used by PyTorch's MNIST example.
    """

    torchvision_class = tvd.MNIST
    mean = (0.1307,)
    std = (0.3081,)
