"""Files, safely: atomic writes and the one way bnzoo reads a checkpoint.

A file is first written to a temporary file *in the same directory*, flushed to disk, and then renamed over the
target with ``os.replace``: a run killed while saving leaves the previous file intact, never a truncated one
(Lightning's own save writes through a temporary file in the system temp directory, which is not atomic when that
lies on another file system). A run killed with ``kill -9`` in the middle of a save leaves its temporary file
(``.<name>.<random>.tmp``) behind; :func:`sweep_temporaries` removes them.

Every checkpoint bnzoo reads goes through :func:`safe_torch_load`: ``torch.load(..., weights_only=True)`` passed
explicitly, so neither torch's default nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment can turn it
off, and whatever torch raises on a file that is not a checkpoint (empty, truncated, random bytes: ``EOFError``,
``RuntimeError``, ``KeyError``...) becomes one :class:`UnreadableCheckpointError` naming the file. Lightning's own
loads reach it through :mod:`bnzoo.checkpoint_io`.
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
