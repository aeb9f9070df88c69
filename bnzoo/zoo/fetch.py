"""Getting a checkpoint's bytes, verified: locate a registered name, a path or a URL; download URLs into the cache
(``cache_dir=``, else ``$BNZOO_CACHE_DIR``, else ``<torch.hub.get_dir()>/bnzoo``), verified against their sha256
before they are written, and written atomically."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_bytes
from ..resources import checkpoint_dir
from .index import INDEX_FILE, entry_path, is_pretrained, pretrained_info, unknown_name_message, zoo_entry_of

CACHE_DIR_ENV = "BNZOO_CACHE_DIR"


URL_SCHEMES = ("http", "https", "file")


DOWNLOAD_TIMEOUT_S = 60.0


#: Lightning's own values of ``--ckpt_path`` that :func:`resolve_ckpt_path` passes through (the CLI resolves
#: ``last`` and ``best`` to a file of the run first; ``hpc`` is SLURM's requeue checkpoint in the run folder)
LIGHTNING_CKPT_PATHS = ("best", "last", "hpc")


class ChecksumError(ValueError):
    """A file's sha256 differs from the expected one (corrupt, truncated or modified)."""


# -- hashing and downloading ------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_sha256(entry: dict[str, Any], given: str | None, source: str) -> str:
    """The sha256 a zoo file must have: its index entry's (a different ``sha256=`` given for it is refused)."""
    expected = entry["sha256"].lower()
    if given is not None and given.lower() != expected:
        raise ChecksumError(f"sha256={given} was given for {source!r}, whose index entry says {expected}")
    return expected


def check_sha256(data: bytes, expected: str | None, where: str) -> None:
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ChecksumError(
            f"{where}: sha256 {actual} does not match the expected {expected.lower()}; the file is corrupt or was "
            "modified. Nothing was loaded: delete it and get it again"
        )


def is_url(source: Any) -> bool:
    """Whether ``source`` is an ``http``, ``https`` or ``file`` URL (the schemes bnzoo downloads)."""
    return isinstance(source, str) and urllib.parse.urlparse(source).scheme in URL_SCHEMES


def resolve_cache_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads go: ``directory``, else ``$BNZOO_CACHE_DIR``, else ``<torch.hub.get_dir()>/bnzoo``."""
    if directory is not None:
        return Path(directory).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path(torch.hub.get_dir()) / "bnzoo"


def download(url: str, sha256: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local copy of ``url`` (``http``, ``https`` or ``file``) in the cache, downloaded when missing (or when
    the cached copy does not match ``sha256``). The download is verified against ``sha256`` before it is written,
    and written atomically, so the cache never holds a partial file, nor one that failed its sha256. Files live under
    ``<cache_dir>/<hash of the URL>/<file name>``: two URLs with the same file name never share a copy."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in URL_SCHEMES:
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r} in {url!r}; valid: {', '.join(URL_SCHEMES)}")
    file_name = Path(urllib.parse.unquote(parsed.path)).name
    if not file_name:
        raise ValueError(f"URL {url!r} names no file")
    target = resolve_cache_dir(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16] / file_name
    if target.is_file() and (sha256 is None or file_sha256(target) == sha256.lower()):
        return target
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
            data = response.read()
    except urllib.error.URLError as err:
        raise FileNotFoundError(f"could not download {url}: {err.reason}") from err
    check_sha256(data, sha256, url)
    atomic_write_bytes(target, data)
    return target


def locate(
    source: str | os.PathLike[str], sha256: str | None, cache_dir: str | os.PathLike[str] | None
) -> tuple[Path, str | None, dict[str, Any] | None]:
    """(local file, the sha256 it must have or None, its index entry or None) of a name, URL or path."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a registered name, a path or a URL, got {type(source).__name__} {source!r}")
    if isinstance(source, str) and is_pretrained(source):
        entry = pretrained_info(source)
        path = entry_path(entry)
        expected = expected_sha256(entry, sha256, source)
        if not path.is_file():
            if not entry.get("url"):
                raise FileNotFoundError(f"{path} (checkpoint {source!r} of {checkpoint_dir() / INDEX_FILE}) is missing")
            path = download(entry["url"], expected, cache_dir)
        return path, expected, entry
    if isinstance(source, str) and is_url(source):
        parsed = urllib.parse.urlparse(source)
        entry = zoo_entry_of(Path(urllib.parse.unquote(parsed.path))) if parsed.scheme == "file" else None
        expected = expected_sha256(entry, sha256, source) if entry else sha256
        return download(source, expected, cache_dir), expected, entry
    path = Path(source).expanduser()
    if path.is_file():
        entry = zoo_entry_of(path)
        return path, expected_sha256(entry, sha256, str(source)) if entry else sha256, entry
    if isinstance(source, str) and os.sep not in source and not Path(source).suffix:
        raise ValueError(unknown_name_message(source))
    raise FileNotFoundError(f"no checkpoint file {str(path)!r} (and it is no registered name nor URL)")


def read_checkpoint_bytes(source: Any) -> bytes:
    """The bytes of a checkpoint: a local path; an ``http(s)``/``file`` URL, downloaded with
    :func:`bnzoo.zoo.download` (atomically, cached by the hash of the whole URL); another fsspec URL; or an open
    binary file. Nothing is unpickled here."""
    if hasattr(source, "read"):
        return source.read()
    if is_url(str(source)) and "://" in str(source):
        return Path(download(str(source))).read_bytes()
    if "://" in str(source):  # another fsspec file system
        from lightning.fabric.utilities.cloud_io import get_filesystem  # Lightning is imported only for this

        fs = get_filesystem(source)
        if not fs.exists(source):
            raise FileNotFoundError(f"no checkpoint file {str(source)!r}")
        with fs.open(source, "rb") as f:
            return f.read()
    if not Path(source).is_file():
        raise FileNotFoundError(f"no checkpoint file {str(source)!r}")
    return Path(source).read_bytes()
