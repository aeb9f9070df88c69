"""CIFAR-10 and CIFAR-100 DataModules, read from the "python version" batch files.

Integrity design. torchvision's ``CIFAR10`` checks the md5 of every batch file each time it is built, so only
the exact official files load. bnzoo splits the two jobs:

* at download time, :meth:`CifarDataModule.prepare_data` calls torchvision's
  ``download_and_extract_archive`` with torchvision's own URL and archive md5
  (``torchvision.datasets.CIFAR10.url`` / ``.tgz_md5``): a damaged or tampered download is rejected before
  it is extracted;
* at load time, the extracted files in ``<data_dir>/cifar-10-batches-py/`` (or ``cifar-100-python/``) are
  unpickled by a restricted unpickler that builds only numpy arrays and plain containers (no arbitrary code
  from a file), and each is checked for its structure: a ``data`` uint8 array of rows of 3 x 32 x 32 pixels
  and as many labels in ``[0, num_classes)``. A truncated, damaged or foreign file fails with an error naming
  it; a file in the right format loads whatever its content.

So the loading path a user runs is the one the tests run on tiny files in the real format, and the download
path is tested by serving a tiny archive (with its own md5) over HTTP from the test.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.datasets as tvd
from torch import Tensor
from torchvision.datasets.utils import download_and_extract_archive

from .base import ImageDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CifarDataModule", "load_cifar_batch"]

_PIXELS = 3 * 32 * 32

# What a CIFAR batch pickle may reference: numpy's array reconstruction (numpy 1 and 2 module names, pickle
# protocols 2 and 5) and the codec numpy uses for raw bytes under protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # files pickled with numpy 1 (the official ones)
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch file")
        return super().find_class(module, name)


def load_cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    """One CIFAR batch file: images uint8 (N, 3, 32, 32), labels long (N,). Raises ValueError naming ``path``
    when the file is not a CIFAR batch."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a readable CIFAR batch file ({type(err).__name__}: {err})") from err
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: expected a dict with 'data' and {label_key!r}, got {keys}")
    data, labels = entry["data"], np.asarray(entry[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' is {desc}, expected uint8 (N, {_PIXELS})")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {label_key!r} has shape {labels.shape}, expected {len(data)} integer labels")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)  # rows are R, G, B planes
    return images, torch.from_numpy(labels.astype(np.int64))


class CifarDataModule(ImageDataModule):
    """Base of CIFAR-10/100 (Krizhevsky 2009): 50000 training and 10000 test 32x32 color images.

    Augmentation (``augment=True``): 4 pixels of zero padding, a random 32x32 crop and a random horizontal
    flip, as in He et al. 2016, Sec. 4.2.
    """

    torchvision_class: ClassVar[type[tvd.CIFAR10]]
    """The torchvision dataset that provides the URL, the archive md5, and the folder and file names."""
    label_key: ClassVar[str]

    in_chans = 3
    image_size = 32
    crop_padding = 4
    hflip = True

    @property
    def folder(self) -> Path:
        return self.data_dir / self.torchvision_class.base_folder

    def file_names(self, train: bool) -> list[str]:
        tv = self.torchvision_class
        return [name for name, _md5 in (tv.train_list if train else tv.test_list)]

    def how_to_get(self) -> str:
        tv = self.torchvision_class
        return (
            f"To get the data: pass download=True (torchvision downloads {tv.url} and checks its md5), or "
            f"extract {tv.filename} into {self.data_dir}/ yourself."
        )

    def prepare_data(self) -> None:
        files = self.file_names(True) + self.file_names(False)
        if not self.download or all((self.folder / name).is_file() for name in files):
            return
        tv = self.torchvision_class
        try:
            download_and_extract_archive(tv.url, str(self.data_dir), filename=tv.filename, md5=tv.tgz_md5)
        except (RuntimeError, OSError) as err:
            raise RuntimeError(f"downloading {tv.url} into {self.data_dir} failed: {err}\n{self.how_to_get()}") from err

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        batches = []
        for name in self.file_names(train):
            path = self.folder / name
            if not path.is_file():
                hint = (
                    " (download=True downloads in prepare_data(), which runs before setup())" if self.download else ""
                )
                raise FileNotFoundError(f"{path} not found{hint}. {self.how_to_get()}")
            try:
                batches.append(load_cifar_batch(path, self.label_key))
            except ValueError as err:
                raise ValueError(
                    f"corrupt data file: {err}. Delete {self.folder} and get it again. {self.how_to_get()}"
                ) from err
        images, labels = zip(*batches, strict=True)
        return torch.cat(images), torch.cat(labels)


class CIFAR10DataModule(CifarDataModule):
    """CIFAR-10: 10 classes.

    ``mean``/``std``: the widely used per-channel pixel mean and population standard deviation of the 50000
    training images (not recomputed here: there is no CIFAR copy offline; ``normalization="train"`` computes
    them from your copy).
    """

    torchvision_class = tvd.CIFAR10
    label_key = "labels"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CifarDataModule):
    """CIFAR-100: 100 classes (the ``fine_labels``).

    ``mean``/``std``: the widely used per-channel pixel mean and population standard deviation of the 50000
    training images (not recomputed here, as for CIFAR-10).
    """

    torchvision_class = tvd.CIFAR100
    label_key = "fine_labels"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
