"""Atomic checkpoint files and the one safe way bnzoo loads them.

A checkpoint is first written to a temporary file *in the same directory*, flushed to disk, and then renamed
over the target with ``os.replace``: a run killed while saving leaves the previous checkpoint intact, never a
truncated one. (Lightning's own save writes through a temporary file in the system temp directory, which is
not atomic when that lies on another file system.) A run killed with ``kill -9`` in the middle of a save leaves
its temporary file (``.<name>.<random>.tmp``) behind; :func:`sweep_temporaries` removes them.

Every checkpoint bnzoo reads -- its own loads; through :class:`AtomicCheckpointIO`, every load Lightning's trainer
makes (``fit``/``validate``/``test``/``predict`` with ``ckpt_path``, a resumed run); and, through
:class:`SafeLoadFromCheckpoint`, ``load_from_checkpoint`` of bnzoo's tasks and data modules -- goes through
:func:`safe_torch_load`: ``torch.load(..., weights_only=True)`` passed explicitly, so neither torch's default nor
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment can turn it off, and whatever torch raises on a file
that is not a checkpoint (empty, truncated, random bytes: ``EOFError``, ``RuntimeError``, ``KeyError``...)
becomes one :class:`UnreadableCheckpointError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoint_trust import check_checkpoint_hyperparameters

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointLoadError",
    "SafeLoadFromCheckpoint",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "read_checkpoint_bytes",
    "safe_safetensors_load",
    "safe_torch_load",
    "sweep_temporaries",
]

#: the temporary files :func:`atomic_write_bytes` writes next to their target: ``.<target name>.<random>.tmp``
TEMPORARY_FILE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


class CheckpointLoadError(ValueError):
    """A file could not be loaded as a checkpoint (see the two subclasses); nothing in it ran."""


class UnsafeCheckpointError(CheckpointLoadError):
    """``torch.load(weights_only=True)`` refused a file: its pickle would import or call something (or is not the
    restricted pickle a weights-only checkpoint is)."""


class UnreadableCheckpointError(CheckpointLoadError):
    """A file is not a torch checkpoint at all: empty, truncated, or not torch's format."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sweep_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_write_bytes` left in ``folder`` when its process was killed
    mid-write (``.<name>.<random>.tmp``; nothing else is touched). Call it only on a folder no other process is
    writing to. Returns the removed paths."""
    directory = Path(folder)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if TEMPORARY_FILE.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _first_reason(err: BaseException) -> str:
    """The telling line of torch's (often 10-line) error message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load", "Unsupported", "Weights only load failed")) and "PyTorch 2.6" not in line:
            return line.rstrip(".")
    unpickler = next((i for i, line in enumerate(lines) if line.endswith("WeightsUnpickler error:")), None)
    if unpickler is not None and unpickler + 1 < len(lines):
        return lines[unpickler + 1].rstrip(".")
    if isinstance(err, EOFError) or not lines:
        return f"{type(err).__name__}: the file ends too early (empty or truncated)"
    return f"{type(err).__name__}: {lines[0]}"[:300].rstrip(".")


def safe_torch_load(
    source: str | os.PathLike[str] | io.BytesIO, map_location: Any = "cpu", *, label: Any = None
) -> Any:
    """``torch.load(source, weights_only=True)``, the one load every bnzoo code path uses.

    ``weights_only=True`` is passed explicitly: tensors and plain types only, whatever the environment says. A
    pickle that would import or call anything raises :class:`UnsafeCheckpointError`, a file that is no torch
    checkpoint (empty, truncated, garbage) :class:`UnreadableCheckpointError`; both name the file (``label``, else
    ``source``) and nothing in the file runs. A missing file is a ``FileNotFoundError``."""
    where = label if label is not None else source
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise FileNotFoundError(f"no checkpoint file {str(where)!r}")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{where}: refused to load: torch.load(weights_only=True) found more than tensors and plain types "
            f"({_first_reason(err)}). bnzoo never unpickles code; if you trust this file, load it yourself"
        ) from err
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 -- torch raises a dozen types on bad bytes; all mean "not a checkpoint"
        raise UnreadableCheckpointError(
            f"{where}: not a readable torch checkpoint ({_first_reason(err)}); it is empty, truncated or not a "
            "file written by torch.save"
        ) from err


def _is_url(path: Any) -> bool:
    return str(path).split("://", 1)[0] in ("http", "https", "file") and "://" in str(path)


def _refuse_weights_only_false(path: Any) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to load with weights_only=False (--weights_only false): bnzoo loads every checkpoint with "
        "weights_only=True (tensors and plain types), so no checkpoint can run code"
    )


def read_checkpoint_bytes(source: Any) -> bytes:
    """The bytes of a checkpoint: a local path; an ``http(s)``/``file`` URL, downloaded with
    :func:`bnzoo.hub.download` (atomically, cached by the hash of the whole URL); another fsspec URL; or an open
    binary file. Nothing is unpickled here."""
    if hasattr(source, "read"):
        return source.read()
    if _is_url(source):
        from .hub import download  # the hub's verified, atomically cached download

        return Path(download(str(source))).read_bytes()
    if "://" in str(source):  # another fsspec file system
        fs = get_filesystem(source)
        if not fs.exists(source):
            raise FileNotFoundError(f"no checkpoint file {str(source)!r}")
        with fs.open(source, "rb") as f:
            return f.read()
    if not Path(source).is_file():
        raise FileNotFoundError(f"no checkpoint file {str(source)!r}")
    return Path(source).read_bytes()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose local saves are atomic (remote paths fall back to Lightning's save) and whose
    every load is :func:`safe_torch_load`.

    Lightning's own load passes ``weights_only=False`` for ``http(s)`` paths and leaves the default to torch (and
    so to ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) otherwise; this one refuses ``weights_only=False``, downloads
    URLs with :func:`bnzoo.hub.download` (cached by the hash of the URL, not by file name) and loads every file
    with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(str(path)), exist_ok=True)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise _refuse_weights_only_false(path)
        if "://" in str(path):
            return safe_torch_load(io.BytesIO(read_checkpoint_bytes(path)), map_location, label=path)
        return safe_torch_load(path, map_location)


class SafeLoadFromCheckpoint:
    """Mixin (before ``L.LightningModule`` / ``L.LightningDataModule`` in the bases) whose ``load_from_checkpoint``
    loads the way every bnzoo load does.

    Lightning's ``load_from_checkpoint`` leaves ``weights_only`` to torch's default (which
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off) and passes ``weights_only=False`` for an ``http(s)`` URL.
    Here the file's bytes are read once (:func:`read_checkpoint_bytes`), loaded with :func:`safe_torch_load`, its
    hyperparameters checked (:func:`bnzoo.checkpoint_trust.check_checkpoint_hyperparameters`: no class outside
    bnzoo, Lightning and torch, no ``model_options.pretrained``), and only then the same bytes go to Lightning's
    ``load_from_checkpoint`` with ``weights_only=True``. ``weights_only=False`` is refused."""

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        if weights_only is False:
            raise _refuse_weights_only_false(checkpoint_path)
        label = checkpoint_path if isinstance(checkpoint_path, (str, os.PathLike)) else "<file object>"
        data = read_checkpoint_bytes(checkpoint_path)
        check_checkpoint_hyperparameters(safe_torch_load(io.BytesIO(data), label=label), str(label))
        return super().load_from_checkpoint(  # type: ignore[misc]
            io.BytesIO(data), map_location, hparams_file, strict, weights_only=True, **kwargs
        )


def safe_safetensors_load(data: bytes, label: Any) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the bytes of a safetensors file; a malformed file (a header size past the end, a
    header that is no JSON object, bad tensor data) is one :class:`UnreadableCheckpointError` naming ``label``.
    The format (u64 little-endian header size, a JSON header, the tensor bytes) holds no code to run."""
    from safetensors.torch import load as load_safetensors

    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than the 8-byte header size")
        header_size = int.from_bytes(data[:8], "little")
        if header_size > len(data) - 8:
            raise ValueError(f"header size {header_size} is past the end of the {len(data)}-byte file")
        header = json.loads(data[8 : 8 + header_size])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
        tensors = load_safetensors(data)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 -- json, safetensors' Rust errors...: all mean "not a safetensors file"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableCheckpointError(f"{label}: not a readable safetensors file ({reason})") from err
    return metadata, tensors
