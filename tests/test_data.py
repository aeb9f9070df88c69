"""bnzoo.data: the DataModules load the real file formats, split, augment, normalize and build sequence tasks.

Tiny files are written here in each real format (IDX for MNIST, pickled batches and the tar.gz archive for
CIFAR) with independent writers, then loaded through the code path a user runs; downloads go through
torchvision's download code against a local HTTP server. References are independent of bnzoo: torchvision's
own readers, numpy float64 statistics, brute-force searches, the scikit-learn arrays.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from torch import nn

from bnzoo.data import (
    IMAGE_DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SequenceDataModule,
    SortaGradSampler,
    list_datasets,
    read_idx,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_debian_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


# -- writers of the real formats (independent of bnzoo) ------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of LeCun's MNIST page: 0, 0, type 0x08, ndim, big-endian uint32 sizes, raw bytes."""
    return (
        struct.pack(">HBB", 0, 0x08, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def write_idx_dataset(
    raw_dir: Path, n_train: int, n_test: int, seed: int, gz: bool = True
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        if gz:
            (raw_dir / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (raw_dir / name).write_bytes(idx_bytes(array))
    return arrays


def cifar_batch(n: int, num_classes: int, label_key: str, rng: np.random.Generator) -> dict:
    """A batch dict as in the official python-version files: rows of 3072 bytes (R, G, B planes of 32x32)."""
    batch = {
        "batch_label": "tiny batch",
        label_key: rng.integers(0, num_classes, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    if label_key == "fine_labels":
        batch["coarse_labels"] = rng.integers(0, 20, n).tolist()
    return batch


def write_cifar(folder: Path, cifar100: bool, n: int = 6, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if cifar100:
        files = {
            "train": cifar_batch(2 * n, 100, "fine_labels", rng),
            "test": cifar_batch(n, 100, "fine_labels", rng),
        }
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20})
    else:
        files = {f"data_batch_{i}": cifar_batch(n, 10, "labels", rng) for i in range(1, 6)}
        files["test_batch"] = cifar_batch(n, 10, "labels", rng)
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n})
    for name, content in [*files.items(), meta]:
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return files


def tar_gz(source: Path, arcname: str, target: Path) -> str:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return hashlib.md5(target.read_bytes()).hexdigest()


@contextlib.contextmanager
def http_server(directory: Path):
    """Serve ``directory`` on 127.0.0.1 so torchvision's download code runs for real, offline."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def normalized(images: np.ndarray, mean, std, pixel_max: float = 255.0) -> torch.Tensor:
    """float64 reference of the normalization, images (N, C, H, W)."""
    x = images.astype(np.float64) / pixel_max
    x = (x - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    return torch.from_numpy(x)


def full_batch(loader) -> tuple[torch.Tensor, ...]:
    batches = list(loader)
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


# -- Fashion-MNIST from Debian's files -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def debian_fashion():
    dm = FashionMNISTDataModule(data_dir="/nonexistent-bnzoo-data", download=False)
    return dm, dm.load_split(train=True), dm.load_split(train=False)


@needs_debian_fashion
def test_fashion_mnist_debian_files(debian_fashion):
    dm, (train_x, train_y), (test_x, test_y) = debian_fashion
    assert dm.find_dir() == DEBIAN_FASHION
    assert train_x.shape == (60000, 1, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 1, 28, 28) and test_y.shape == (10000,)
    assert int(train_y[0]) == 9  # torchvision's reading of the same files: first training label "Ankle boot"
    # the dataset is balanced (Xiao et al. 2017): 6000 training and 1000 test images per class
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert torch.bincount(test_y).tolist() == [1000] * 10


@needs_debian_fashion
def test_fashion_mnist_constants_match_float64_statistics(debian_fashion):
    dm, (train_x, _), _ = debian_fashion
    counts = np.bincount(train_x.numpy().ravel(), minlength=256).astype(np.float64)  # exact, in float64
    values = np.arange(256) / 255.0
    mean = counts @ values / counts.sum()
    std = np.sqrt(counts @ (values - mean) ** 2 / counts.sum())
    assert dm.mean[0] == pytest.approx(mean, abs=1e-4) and dm.std[0] == pytest.approx(std, abs=1e-4)


@needs_debian_fashion
def test_fashion_mnist_normalized_training_batches(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=500, train_subset=4000, download=False)
    dm.setup("fit")
    x, y = full_batch(dm.train_dataloader())
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_data_dir_is_searched_before_the_system_copy(tmp_path):
    written = write_idx_dataset(tmp_path / "FashionMNIST" / "raw", n_train=7, n_test=3, seed=1)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False)
    assert dm.find_dir() == tmp_path / "FashionMNIST" / "raw"
    images, labels = dm.load_split(train=True)
    assert torch.equal(images[:, 0], torch.from_numpy(written["train-images-idx3-ubyte"]))
    assert torch.equal(labels, torch.from_numpy(written["train-labels-idx1-ubyte"]).long())


def test_idx_reader_agrees_with_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    written = write_idx_dataset(tmp_path / "plain", n_train=5, n_test=2, seed=2, gz=False)
    write_idx_dataset(tmp_path / "gz", n_train=5, n_test=2, seed=2, gz=True)
    images = read_image_file(str(tmp_path / "plain" / "train-images-idx3-ubyte"))
    labels = read_label_file(str(tmp_path / "plain" / "train-labels-idx1-ubyte"))
    assert torch.equal(read_idx(tmp_path / "plain" / "train-images-idx3-ubyte", 3), images)
    assert torch.equal(read_idx(tmp_path / "gz" / "train-images-idx3-ubyte.gz", 3), images)
    assert torch.equal(read_idx(tmp_path / "gz" / "train-labels-idx1-ubyte.gz", 1).long(), labels)
    assert torch.equal(images, torch.from_numpy(written["train-images-idx3-ubyte"]))


# -- MNIST: tiny files, download through torchvision ---------------------------------------------------------
def test_mnist_tiny_files_through_the_datamodule(tmp_path):
    written = write_idx_dataset(tmp_path / "MNIST" / "raw", n_train=20, n_test=9, seed=3)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=4, val_size=5, download=False)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 9)
    x, y = full_batch(dm.test_dataloader())
    expected = normalized(written["t10k-images-idx3-ubyte"][:, None], (0.1307,), (0.3081,))
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(y, torch.from_numpy(written["t10k-labels-idx1-ubyte"]).long())
    px, py = full_batch(dm.predict_dataloader())
    assert torch.equal(px, x) and torch.equal(py, y)


def test_mnist_download_runs_torchvision_download_code(tmp_path, monkeypatch):
    served = tmp_path / "server"
    written = write_idx_dataset(served, n_train=6, n_test=4, seed=4)
    resources = [
        (f"{name}.gz", hashlib.md5((served / f"{name}.gz").read_bytes()).hexdigest()) for name in written
    ]
    with http_server(served) as url:
        monkeypatch.setattr(tvd.MNIST, "mirrors", [f"{url}/"])
        monkeypatch.setattr(tvd.MNIST, "resources", resources)
        dm = MNISTDataModule(data_dir=str(tmp_path / "data"), batch_size=2, val_size=0, download=True)
        dm.prepare_data()
    assert dm.find_dir() == tmp_path / "data" / "MNIST" / "raw"
    dm.setup("test")
    assert torch.equal(dm.test_set.images[:, 0], torch.from_numpy(written["t10k-images-idx3-ubyte"]))


def test_failed_download_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(tvd.MNIST, "mirrors", [closed_port_url()])
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match="MNIST") as err:
        dm.prepare_data()
    assert str(tmp_path / "MNIST" / "raw") in str(err.value) and "download=True" in str(err.value)


# -- CIFAR: tiny batch files, the archive through torchvision's download and md5 check -----------------------
def test_cifar10_tiny_batches_match_torchvision_reading(tmp_path, monkeypatch):
    files = write_cifar(tmp_path / "cifar-10-batches-py", cifar100=False, n=3)
    dm = CIFAR10DataModule(
        data_dir=str(tmp_path), batch_size=4, val_size=0, normalization="none", download=False
    )
    images, labels = dm.load_split(train=True)
    # torchvision's own reader as the reference (md5 checks switched off for the tiny files)
    for files_attr in ("train_list", "test_list"):
        monkeypatch.setattr(
            tvd.CIFAR10, files_attr, [[name, None] for name, _ in getattr(tvd.CIFAR10, files_attr)]
        )
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": None})
    reference = tvd.CIFAR10(str(tmp_path), train=True)
    assert images.shape == (15, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert labels.tolist() == reference.targets
    dm.setup("test")
    x, y = full_batch(dm.test_dataloader())
    expected = files["test_batch"]["data"].reshape(-1, 3, 32, 32)
    torch.testing.assert_close(x.double(), torch.from_numpy(expected / 255.0), atol=1e-6, rtol=0)
    assert y.tolist() == files["test_batch"]["labels"]


def test_cifar100_archive_download_checks_md5(tmp_path, monkeypatch):
    files = write_cifar(tmp_path / "build" / "cifar-100-python", cifar100=True, n=5)
    (tmp_path / "server").mkdir()
    md5 = tar_gz(
        tmp_path / "build" / "cifar-100-python", "cifar-100-python", tmp_path / "server" / "c100.tar.gz"
    )
    with http_server(tmp_path / "server") as url:
        monkeypatch.setattr(tvd.CIFAR100, "url", f"{url}/c100.tar.gz")
        monkeypatch.setattr(tvd.CIFAR100, "tgz_md5", "0" * 32)
        bad = CIFAR100DataModule(data_dir=str(tmp_path / "bad"), download=True)
        with pytest.raises(RuntimeError, match="c100.tar.gz") as err:
            bad.prepare_data()
        assert "download=True" in str(err.value)
        assert not (tmp_path / "bad" / "cifar-100-python").exists()  # nothing extracted from a bad archive

        monkeypatch.setattr(tvd.CIFAR100, "tgz_md5", md5)
        dm = CIFAR100DataModule(data_dir=str(tmp_path / "data"), batch_size=5, val_size=0, download=True)
        dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 100 and len(dm.train_set) == 10 and len(dm.test_set) == 5
    assert dm.test_set.labels.tolist() == files["test"]["fine_labels"]
    assert torch.equal(dm.test_set.images, torch.from_numpy(files["test"]["data"]).view(-1, 3, 32, 32))


# -- bad input -----------------------------------------------------------------------------------------------
def test_missing_files_name_the_path_and_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        MNISTDataModule(data_dir=str(tmp_path), download=False).setup("fit")
    assert str(tmp_path / "MNIST" / "raw") in str(err.value) and "download=True" in str(err.value)

    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", ())
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(data_dir=str(tmp_path), download=False).setup("test")

    with pytest.raises(FileNotFoundError) as err:
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).setup("fit")
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(err.value)
    assert tvd.CIFAR10.url in str(err.value)


def test_corrupt_files_name_the_path(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_dataset(raw, n_train=4, n_test=2, seed=5)
    damaged = raw / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    with pytest.raises(ValueError, match="download=True") as err:
        MNISTDataModule(data_dir=str(tmp_path), download=False).load_split(train=True)
    assert str(damaged) in str(err.value)

    short = raw / "t10k-labels-idx1-ubyte.gz"
    short.write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))[:-1]))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*bytes"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).load_split(train=False)

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, cifar100=False, n=2)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError) as err:
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).load_split(train=True)
    assert str(folder / "data_batch_3") in str(err.value) and "download=True" in str(err.value)


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, cifar100=False, n=2)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).load_split(train=False)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar10.*digits.*fashion_mnist.*mnist"):
        SequenceDataModule(dataset="imagenet")
    with pytest.raises(ValueError, match="unknown mode 'column'; valid: pixel, row"):
        SequenceDataModule(dataset="digits", mode="column")
    with pytest.raises(ValueError, match="unknown normalization 'zca'"):
        DigitsDataModule(normalization="zca")
    with pytest.raises(ValueError, match="val_size"):
        DigitsDataModule(val_size=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"min_length must be in \[1, 8\]"):
        SequenceDataModule(dataset="digits", mode="row", variable_length=True, min_length=9)
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "mnist"]


# -- digits, splits, augmentation, normalization -------------------------------------------------------------
def test_digits_are_sklearns_images():
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = DigitsDataModule(batch_size=16, val_size=100)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 8)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1337, 100, 360)
    ours = torch.cat([dm.train_set.images, dm.val_set.images, dm.test_set.images])[:, 0]
    ours_labels = torch.cat([dm.train_set.labels, dm.val_set.labels, dm.test_set.labels])
    key = lambda image, label: image.astype(np.uint8).tobytes() + bytes([label])  # noqa: E731
    assert sorted(key(i, int(t)) for i, t in zip(ours.numpy(), ours_labels, strict=True)) == sorted(
        key(i, int(t)) for i, t in zip(digits.images, digits.target, strict=True)
    )
    x, y = next(iter(dm.train_dataloader()))
    assert (
        x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.long
    )


def test_split_is_disjoint_and_fixed_by_the_seed():
    def split(seed: int) -> tuple[set[int], set[int]]:
        dm = DigitsDataModule(val_size=0.2, seed=seed)
        dm.setup("fit")
        return set(dm.train_set.indices.tolist()), set(dm.val_set.indices.tolist())

    train, val = split(0)
    assert not train & val and train | val == set(range(1437)) and len(val) == round(0.2 * 1437)
    assert split(0) == (train, val)
    assert split(1)[1] != val

    dm = DigitsDataModule(val_size=0.2, seed=0, train_subset=100)
    dm.setup("fit")
    subset = set(dm.train_set.indices.tolist())
    assert len(subset) == 100 and subset <= train and set(dm.val_set.indices.tolist()) == val


def brute_force_crop_flip(original: torch.Tensor, augmented: torch.Tensor, padding: int, flips: bool):
    """All (dy, dx, flip) whose crop of the zero-padded original equals ``augmented``."""
    padded = F.pad(original, (padding,) * 4)
    height, width = original.shape[-2:]
    found = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            for flip in (False, True) if flips else (False,):
                crop = padded[..., dy : dy + height, dx : dx + width]
                if torch.equal(crop.flip(-1) if flip else crop, augmented):
                    found.append((dy, dx, flip))
    return found


def test_augmentation_changes_images_only_in_training(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", cifar100=False, n=40, seed=6)
    dm = CIFAR10DataModule(
        data_dir=str(tmp_path), batch_size=50, augment=True, normalization="none", val_size=50, download=False
    )
    dm.setup("fit")
    samples = [dm.train_set[i] for i in range(150)]
    originals = torch.stack([image for image, _ in samples])
    augmented, _ = dm.train_dataloader().collate_fn(samples)
    augmented_pixels = (augmented * 255).round().to(torch.uint8)
    seen = set()
    for original, image in zip(originals, augmented_pixels, strict=True):
        matches = brute_force_crop_flip(original, image, padding=4, flips=True)
        assert len(matches) == 1  # a crop of the zero-padded image or of its mirror image
        seen.add(matches[0])
    assert len(seen) > 50 and {flip for _, _, flip in seen} == {False, True}

    dm.setup("test")
    for loader, split in ((dm.val_dataloader(), dm.val_set), (dm.test_dataloader(), dm.test_set)):
        x, _ = full_batch(loader)
        torch.testing.assert_close(x.double(), split.images.double() / 255, atol=1e-6, rtol=0)
    plain = DigitsDataModule(batch_size=8, augment=False)
    plain.setup("fit")
    x, _ = plain.train_dataloader().collate_fn([plain.train_set[i] for i in range(8)])
    torch.testing.assert_close(
        x.double(), normalized(plain.train_set.images[:8].numpy(), plain.mean, plain.std, 16)
    )


def test_augmentation_overrides_crop_padding_and_hflip(tmp_path):
    """crop_padding / hflip replace the dataset's augmentation: flips only, crops only, and bad values named."""
    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", n_train=120, n_test=3, seed=2)
    common = {"data_dir": str(tmp_path), "augment": True, "normalization": "none", "val_size": 0, "download": False}
    cases = {(0, True): (0, True), (3, False): (3, False), (None, None): (2, True)}  # None: Fashion-MNIST's 2, flips
    for (padding, flips), (want_padding, want_flips) in cases.items():
        dm = FashionMNISTDataModule(batch_size=120, crop_padding=padding, hflip=flips, **common)
        dm.setup("fit")
        samples = [dm.train_set[i] for i in range(120)]
        augmented, _ = dm.train_dataloader().collate_fn(samples)
        seen = set()
        for (original, _), image in zip(samples, (augmented * 255).round().to(torch.uint8), strict=True):
            matches = brute_force_crop_flip(original, image, padding=want_padding, flips=want_flips)
            assert matches  # a crop of the zero-padded image (or of its mirror image where flips are on)
            seen.update(matches)
        assert {flip for _, _, flip in seen} == ({False, True} if want_flips else {False})
        offsets = {(dy, dx) for dy, dx, _ in seen}  # each within [0, 2 * padding] by the brute force above
        assert offsets == {(0, 0)} if want_padding == 0 else len(offsets) > (2 * want_padding + 1) ** 2 // 2
        assert dm.hparams.crop_padding == padding and dm.hparams.hflip == flips
    assert FashionMNISTDataModule.crop_padding == 2 and FashionMNISTDataModule.hflip  # class defaults untouched
    with pytest.raises(ValueError, match="crop_padding must be an int >= 0 or None, got -1"):
        FashionMNISTDataModule(crop_padding=-1)
    with pytest.raises(ValueError, match="hflip must be true, false or null.*got 'yes'"):
        FashionMNISTDataModule(hflip="yes")


def test_normalization_statistics(tmp_path):
    digits = DigitsDataModule(batch_size=100, val_size=0)
    digits.setup("fit")
    x, _ = full_batch(digits.train_dataloader())
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05

    write_cifar(tmp_path / "cifar-10-batches-py", cifar100=False, n=20, seed=7)
    dm = CIFAR10DataModule(
        data_dir=str(tmp_path), batch_size=10, val_size=0, normalization="train", download=False
    )
    dm.setup("fit")
    x, _ = full_batch(dm.train_dataloader())
    reference = dm.train_set.images.numpy().astype(np.float64) / 255
    stats = dm.normalizer()
    torch.testing.assert_close(
        torch.tensor(stats.mean, dtype=torch.float64), torch.from_numpy(reference.mean((0, 2, 3)))
    )
    torch.testing.assert_close(
        torch.tensor(stats.std, dtype=torch.float64), torch.from_numpy(reference.std((0, 2, 3)))
    )
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)


def test_loader_settings_and_workers():
    dm = DigitsDataModule(batch_size=32, num_workers=1, train_subset=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory == torch.cuda.is_available() and loader.persistent_workers and loader.drop_last
    batches = iter(loader)
    x, y = next(batches)  # assembled in a worker process
    assert x.shape == (32, 1, 8, 8)
    del batches, loader  # stop the persistent worker now rather than at some later garbage collection
    # spawn/forkserver workers receive the collate functions pickled
    samples = [dm.train_set[i] for i in range(4)]
    collate = pickle.loads(pickle.dumps(dm.collate_fn(train=True)))
    torch.testing.assert_close(collate(samples), dm.collate_fn(train=True)(samples))
    seq = SequenceDataModule(dataset="digits", permute=True, variable_length=True)
    seq.setup("fit")
    samples = [seq.train_set[i] for i in range(4)]
    collate = pickle.loads(pickle.dumps(seq.collate_fn(train=True)))
    torch.testing.assert_close(collate(samples), seq.collate_fn(train=True)(samples))
    assert not DigitsDataModule(num_workers=0).num_workers
    with pytest.raises(ValueError, match="fewer than batch_size=128"):
        too_small = DigitsDataModule(batch_size=128, train_subset=100)
        too_small.setup("fit")
        too_small.train_dataloader()


# -- sequence tasks ------------------------------------------------------------------------------------------
def sequence_and_images(**kwargs) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The test split as sequences, and the same images normalized by the image DataModule."""
    seq = SequenceDataModule(dataset="digits", batch_size=360, **kwargs)
    seq.setup("test")
    images = DigitsDataModule(batch_size=360)
    images.setup("test")
    (batch,), (image_batch,) = list(seq.test_dataloader()), list(images.test_dataloader())
    return batch, image_batch[0]


def test_row_and_pixel_sequences_are_the_image():
    dm = SequenceDataModule(dataset="digits", mode="row")
    assert (dm.num_classes, dm.input_size, dm.max_length) == (10, 8, 8)
    (x, lengths, y), images = sequence_and_images(mode="row")
    assert x.shape == (360, 8, 8) and torch.equal(lengths, torch.full((360,), 8))
    assert torch.equal(x, images[:, 0])  # step t is image row t

    dm = SequenceDataModule(dataset="digits", mode="pixel")
    assert (dm.input_size, dm.max_length) == (1, 64)
    (x, lengths, y), images = sequence_and_images(mode="pixel")
    assert x.shape == (360, 64, 1) and torch.equal(x[..., 0], images.flatten(1))
    assert y.dtype == torch.long and lengths.dtype == torch.long


def test_row_sequences_of_color_images_interleave_channels(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", cifar100=False, n=2)
    dm = SequenceDataModule(
        dataset="cifar10", mode="row", data_dir=str(tmp_path), batch_size=2, download=False
    )
    assert (dm.input_size, dm.max_length) == (96, 32)
    dm.setup("test")
    x, _, _ = next(iter(dm.test_dataloader()))
    images = normalized(dm.image_data.test_set.images[:2].numpy(), dm.image_data.mean, dm.image_data.std)
    for t, w, c in [(0, 0, 0), (5, 7, 2), (31, 31, 1)]:
        assert x[1, t, 3 * w + c].item() == pytest.approx(images[1, c, t, w].item(), abs=1e-5)


def test_permuted_pixels_use_one_fixed_permutation():
    perm = SequenceDataModule(dataset="digits", permute=True, task_seed=3).permutation
    assert torch.equal(perm.sort().values, torch.arange(64)) and not torch.equal(perm, torch.arange(64))
    assert torch.equal(SequenceDataModule(dataset="digits", permute=True, task_seed=3).permutation, perm)
    assert not torch.equal(SequenceDataModule(dataset="digits", permute=True, task_seed=4).permutation, perm)
    (x, _, _), images = sequence_and_images(permute=True, task_seed=3)
    assert torch.equal(x[..., 0], images.flatten(1)[:, perm])


def block_means(images: torch.Tensor, k: int) -> torch.Tensor:
    """float64 reference of k x k average pooling (kernel = stride = k) of (N, C, H, W) images."""
    n, c, h, w = images.shape
    return images.double().reshape(n, c, h // k, k, w // k, k).mean(dim=(3, 5))


def test_downsampled_sequences_are_block_means_of_the_image():
    dm = SequenceDataModule(dataset="digits", mode="pixel", downsample=2)
    assert (dm.input_size, dm.max_length, dm.downsample) == (1, 16, 2)
    (x, lengths, _), images = sequence_and_images(mode="pixel", downsample=2)
    pooled = block_means(images, 2)  # (360, 1, 4, 4)
    assert x.shape == (360, 16, 1) and torch.equal(lengths, torch.full((360,), 16))
    torch.testing.assert_close(x[..., 0].double(), pooled.flatten(1), rtol=0, atol=1e-6)
    assert pooled.flatten(1).std() > 0.5  # not a constant image that any pooling would reproduce

    dm = SequenceDataModule(dataset="digits", mode="row", downsample=4)
    assert (dm.input_size, dm.max_length) == (2, 2)
    (x, _, _), images = sequence_and_images(mode="row", downsample=4)
    torch.testing.assert_close(x.double(), block_means(images, 4)[:, 0], rtol=0, atol=1e-6)  # step t: row t
    # 28x28 Fashion-MNIST at 14x14: 196 one-pixel steps, or 14 rows of 14 (no data needed to know the sizes)
    dm = SequenceDataModule(dataset="fashion_mnist", mode="pixel", downsample=2, download=False)
    assert (dm.input_size, dm.max_length) == (1, 196)
    assert SequenceDataModule(dataset="fashion_mnist", mode="row", downsample=2, download=False).input_size == 14


def test_downsampled_permuted_pixels_share_one_permutation_across_splits():
    dm = SequenceDataModule(dataset="digits", permute=True, downsample=2, task_seed=5, batch_size=360)
    perm = dm.permutation
    assert torch.equal(perm.sort().values, torch.arange(16)) and not torch.equal(perm, torch.arange(16))
    again = SequenceDataModule(dataset="digits", permute=True, downsample=2, task_seed=5).permutation
    assert torch.equal(again, perm)
    (x, _, _), images = sequence_and_images(permute=True, downsample=2, task_seed=5)
    torch.testing.assert_close(x[..., 0].double(), block_means(images, 2).flatten(1)[:, perm], rtol=0, atol=1e-6)
    # the training split is made with the same permutation (one collate for both)
    dm.setup("fit")
    samples = [dm.train_set[i] for i in range(8)]
    train_x, _, _ = dm.collate_fn(train=True)(samples)
    raw = torch.stack([image for image, _, _ in samples])
    reference = block_means(dm.image_data.normalizer()(raw), 2).flatten(1)[:, perm]
    torch.testing.assert_close(train_x[..., 0].double(), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [3, 0, 16, True, 2.0])
def test_downsample_must_divide_the_image_size(bad):
    with pytest.raises(ValueError, match=rf"downsample must divide the image size 8, got {bad!r}; valid: 1, 2, 4, 8"):
        SequenceDataModule(dataset="digits", downsample=bad)


def test_variable_length_sequences_are_padded_with_zeros():
    (x, lengths, _), images = sequence_and_images(mode="pixel", variable_length=True, min_length=10)
    assert lengths.min() >= 10 and lengths.max() <= 64 and len(set(lengths.tolist())) > 20
    assert x.shape == (360, int(lengths.max()), 1)
    full = images.flatten(1)
    for i in range(360):
        n = int(lengths[i])
        assert torch.equal(x[i, :n, 0], full[i, :n]) and not x[i, n:].any()

    (_, again, _), _ = sequence_and_images(mode="pixel", variable_length=True, min_length=10)
    assert torch.equal(again, lengths)
    dm = SequenceDataModule(dataset="digits", mode="row", variable_length=True)
    dm.setup("fit")
    assert dm.train_set.lengths.min() >= 4 and dm.train_set.lengths.max() <= 8  # default min: half of max
    # a sample keeps its length whichever split seed puts it in the training or validation set
    other = SequenceDataModule(dataset="digits", mode="row", variable_length=True, seed=1)
    other.setup("fit")
    length_of = dict(zip(dm.train_set.images.indices.tolist(), dm.train_set.lengths.tolist(), strict=True))
    for index, length in zip(
        other.train_set.images.indices.tolist(), other.train_set.lengths.tolist(), strict=True
    ):
        assert length_of.get(index, length) == length


def test_sortagrad_sampler_sorts_the_first_epoch_only():
    lengths = torch.randint(1, 50, (97,), generator=torch.Generator().manual_seed(0))
    sampler = SortaGradSampler(lengths, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(97)) and lengths[first].diff().ge(0).all()
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(97)) and not lengths[second].diff().ge(0).all()
    sampler.set_epoch(2)
    assert list(sampler) != second

    shards = [list(SortaGradSampler(lengths, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 49 and set(shards[0]) | set(shards[1]) == set(range(97))
    assert all(lengths[s].diff().ge(0).all() for s in shards)


class LengthRecorder(L.LightningModule):
    """Records the lengths of every training batch, per epoch."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, 10)
        self.seen: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, lengths, y = batch
        if batch_idx == 0:
            self.seen.append([])
        self.seen[-1].append(lengths)
        return F.cross_entropy(self.linear(x.sum(1) / lengths[:, None]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_sortagrad_with_lightning(tmp_path):
    dm = SequenceDataModule(
        dataset="digits",
        mode="pixel",
        variable_length=True,
        sortagrad=True,
        min_length=1,
        batch_size=32,
        train_subset=320,
    )
    model = LengthRecorder(dm.input_size)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    first, second = (torch.cat(epoch) for epoch in model.seen)
    assert len(first) == len(second) == 320
    assert first.diff().ge(0).all()  # epoch 0: increasing length
    assert not second.diff().ge(0).all()  # then random
    assert sorted(first.tolist()) == sorted(second.tolist())


def test_image_datamodule_fits_without_validation(tmp_path):
    """``val_size=0``: the val DataLoader is empty and Lightning skips validation."""
    dm = DigitsDataModule(batch_size=64, val_size=0, train_subset=128)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.linear(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            raise AssertionError("there is no validation data")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step == 2 and dm.val_dataloader() == []


@pytest.mark.parametrize("cls", [*IMAGE_DATAMODULES.values(), SequenceDataModule], ids=lambda c: c.__name__)
def test_arguments_round_trip_as_plain_config(cls, tmp_path):
    """What LightningCLI does: parse the constructor from strings, dump YAML, parse it back, instantiate.
    The saved hyperparameters load with ``weights_only=True``; the attributes a model links to exist before
    setup."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    config = parser.parse_args(
        ["--data.val_size=100", "--data.train_subset=50", "--data.normalization=train"]
    )
    dm = parser.instantiate(parser.parse_string(parser.dump(config))).data
    assert (
        isinstance(dm, cls) and dm.val_size == 100 and isinstance(dm.val_size, int) and dm.train_subset == 50
    )
    torch.save(dict(dm.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(dm.hparams)
    links = (
        ("num_classes", "input_size", "max_length")
        if cls is SequenceDataModule
        else ("num_classes", "in_chans", "image_size")
    )
    assert all(isinstance(getattr(dm, name), int) for name in links)
