"""The zoo's index: ``index.json`` in the zoo's folder (:func:`bnzoo.resources.checkpoint_dir`), its entries
(each with a plain file name, the sha256 and size of its file, the network it holds) and the lock writers take."""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import fnmatch
import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes
from ..resources import checkpoint_dir

INDEX_FILE = "index.json"


INDEX_FORMAT = 1


CHECKPOINT_SUFFIX = ".ckpt"


SAFETENSORS_SUFFIX = ".safetensors"


#: a sha256 digest as the index stores it
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_index(directory: Path | None = None) -> list[dict[str, Any]]:
    """The entries of ``<directory>/index.json`` (an empty list when there is no index)."""
    path = (directory or checkpoint_dir()) / INDEX_FILE
    if not path.is_file():
        return []
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable index ({err})") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path}: index format {found!r}, expected {INDEX_FORMAT}")
    entries = index.get("checkpoints")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: 'checkpoints' must be a list of entries (JSON objects)")
    return list(entries)


def entry_path(entry: dict[str, Any], directory: Path | None = None) -> Path:
    """The file of index entry ``entry``: ``<zoo folder>/<entry's file>``. The entry's ``file`` must be a plain
    file name (no folder separator, no ``..``, not absolute) and its ``sha256`` 64 hex digits; otherwise a
    ValueError names the entry and what is valid -- an index never points outside its folder."""
    directory = directory or checkpoint_dir()
    name, file, sha256 = entry.get("name"), entry.get("file"), entry.get("sha256")
    where = f"{directory / INDEX_FILE}: entry {name!r}"
    plain_name = isinstance(file, str) and file not in ("", ".", "..") and not any(c in file for c in "/\\\0")
    if not plain_name or Path(file).name != file:
        raise ValueError(
            f"{where} has file {file!r}; an entry's file must be a plain file name inside {directory} "
            "(no folders, no '..', not absolute)"
        )
    if not isinstance(sha256, str) or not _SHA256.match(sha256.lower()):
        raise ValueError(f"{where} has sha256 {sha256!r}; expected 64 hex digits")
    return directory / file


def zoo_entry_of(path: Path) -> dict[str, Any] | None:
    """The index entry of ``path`` when it is (symlinks resolved) a file of the zoo's folder, else None; a file of
    the folder that no entry lists is a ValueError (the zoo folder holds only what its index vouches for)."""
    directory = checkpoint_dir()
    resolved, zoo = path.resolve(), directory.resolve()
    if zoo not in resolved.parents:
        return None
    for entry in read_index():
        with contextlib.suppress(ValueError):
            if entry_path(entry, directory).resolve() == resolved:
                return entry
    raise ValueError(
        f"{path} is a file of the zoo folder {directory} that its index does not list; nothing was "
        "loaded (bnzoo pretrained list shows the registered checkpoints)"
    )


def write_index(entries: list[dict[str, Any]], directory: Path | None = None) -> Path:
    """Write ``entries`` as ``<directory>/index.json``, atomically."""
    path = (directory or checkpoint_dir()) / INDEX_FILE
    text = json.dumps({"format": INDEX_FORMAT, "checkpoints": entries}, indent=2) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


@contextlib.contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock for read-modify-write of ``directory``'s index by several processes (the lock file
    lives in the system temp directory, keyed by the folder, so the zoo folder holds only the zoo)."""
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"bnzoo-index-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def list_pretrained(pattern: str = "*") -> list[str]:
    """Names of the registered checkpoints matching the shell-style ``pattern`` (e.g. ``"*resnet20*"``),
    sorted."""
    names = (e.get("name") for e in read_index())
    return sorted(n for n in names if isinstance(n, str) and fnmatch.fnmatchcase(n, pattern))


def is_pretrained(name: Any) -> bool:
    """Whether ``name`` is a registered checkpoint's name."""
    return isinstance(name, str) and any(e.get("name") == name for e in read_index())


def pretrained_info(name: str) -> dict[str, Any]:
    """The index entry of the registered checkpoint ``name``: architecture, options, dataset, config, training
    steps and time, test accuracy, sha256, size. An unknown name is a ValueError with the closest names."""
    for entry in read_index():
        if entry.get("name") == name:
            return entry
    raise ValueError(unknown_name_message(name))


def unknown_name_message(name: Any) -> str:
    names = list_pretrained()
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return (
        f"unknown pretrained checkpoint {name!r}{hint}. Registered ({len(names)}): {', '.join(names) or 'none'} "
        f"(in {checkpoint_dir() / INDEX_FILE}); a file path or an http(s)/file URL also works"
    )
