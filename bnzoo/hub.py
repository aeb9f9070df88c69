"""Pretrained checkpoints: list them, verify them, download them, load them -- safely.

    >>> import bnzoo
    >>> bnzoo.list_pretrained("fashion_mnist-resnet20-*")
    ['fashion_mnist-resnet20-bn', 'fashion_mnist-resnet20-none', 'fashion_mnist-resnet20-renorm']
    >>> task = bnzoo.load_pretrained("fashion_mnist-resnet20-bn")       # the LightningModule
    >>> net = bnzoo.create_model("resnet20", norm="bn", pretrained=True)  # the bare network

The zoo is ``checkpoints/index.json`` and the files it lists (``BNZOO_CHECKPOINT_DIR`` points elsewhere). Every
load follows the same three rules:

1. **Verify before loading.** A file of the zoo's folder -- named by its registered name, by a path (symlinks
   resolved) or by a ``file://`` URL -- is hashed and compared with the sha256 in the index before anything is
   unpickled; a mismatch is a :class:`ChecksumError` naming the file, and a file of the folder that the index does
   not list is refused. An index entry's ``file`` must be a plain file name (no folder, no ``..``, not absolute).
   A path or URL outside the zoo is verified against ``sha256=`` when given.
2. **Never run code from a file.** The verified bytes go to :func:`bnzoo.checkpoint_io.safe_torch_load`
   (``torch.load(weights_only=True)``, passed explicitly): tensors and plain types only (hyperparameters are
   plain types for this reason). A file whose pickle would import or call anything is refused with an
   :class:`UnsafeCheckpointError`, a file that is no checkpoint with an :class:`UnreadableCheckpointError`, and
   nothing in it runs. Its hyperparameters pass :func:`bnzoo.checkpoint_trust.check_stored_hyperparameters` (class
   paths of bnzoo, Lightning and torch only; no ``model_options.pretrained``), and the task class is chosen from
   bnzoo's own tasks, never imported from a name in the file.
3. **Refuse a checkpoint of another network.** Asking for one architecture or norm and getting a checkpoint of
   another is an :class:`IncompatibleCheckpointError` naming both (:mod:`bnzoo.compatibility`; Batch Renorm keeps
   BatchNorm's state-dict keys, so a bn checkpoint would otherwise load silently into a renorm network).

URLs (``http``, ``https``, ``file``) are downloaded with ``urllib`` into a cache directory (``cache_dir=``, else
``$BNZOO_CACHE_DIR``, else ``<torch.hub.get_dir()>/bnzoo``), verified (when a sha256 is known) before they are
written, and written atomically: the cache never holds a partial file, nor one that failed its sha256. An index
entry may carry a ``url``: when its file is not in the folder it is downloaded from there, and verified against
the entry's sha256.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .checkpoint_io import (
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    atomic_write_bytes,
    safe_safetensors_load,
    safe_torch_load,
)
from .checkpoint_trust import check_stored_hyperparameters
from .compatibility import (
    NOT_IDENTITY,
    IncompatibleCheckpointError,
    check_fits,
    network_options,
    option_differences,
)
from .compatibility import describe as _describe
from .compatibility import plain as _plain
from .errors import TerseArgumentParser
from .models.registry import create_model, model_options

if TYPE_CHECKING:
    from .tasks import ClassificationTask

__all__ = [
    "CHECKPOINT_SUFFIX",
    "INDEX_FORMAT",
    "Checkpoint",
    "ChecksumError",
    "IncompatibleCheckpointError",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "checkpoint_dir",
    "download",
    "entry_path",
    "export_main",
    "export_safetensors",
    "file_sha256",
    "index_lock",
    "is_pretrained",
    "list_pretrained",
    "load_checkpoint",
    "load_pretrained",
    "network_options",
    "pretrained_info",
    "pretrained_main",
    "pretrained_model",
    "read_index",
    "resolve_ckpt_path",
    "write_index",
    "zoo_table",
]

INDEX_FILE = "index.json"
INDEX_FORMAT = 1
CHECKPOINT_SUFFIX = ".ckpt"
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_DIR_ENV = "BNZOO_CHECKPOINT_DIR"
CACHE_DIR_ENV = "BNZOO_CACHE_DIR"
URL_SCHEMES = ("http", "https", "file")
DOWNLOAD_TIMEOUT_S = 60.0

#: Lightning's own values of ``--ckpt_path`` that :func:`resolve_ckpt_path` passes through (the CLI resolves
#: ``last`` and ``best`` to a file of the run first; ``hpc`` is SLURM's requeue checkpoint in the run folder)
LIGHTNING_CKPT_PATHS = ("best", "last", "hpc")



class ChecksumError(ValueError):
    """A file's sha256 differs from the expected one (corrupt, truncated or modified)."""


# -- the index --------------------------------------------------------------------------------------------------
def checkpoint_dir() -> Path:
    """The zoo's folder: ``$BNZOO_CHECKPOINT_DIR``, else ``checkpoints/`` of the repository."""
    env = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "checkpoints"


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


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def entry_path(entry: dict[str, Any], directory: Path | None = None) -> Path:
    """The file of index entry ``entry``: ``<zoo folder>/<entry's file>``. The entry's ``file`` must be a plain
    file name (no folder separator, no ``..``, not absolute) and its ``sha256`` 64 hex digits; otherwise a
    ValueError names the entry and what is valid -- an index never points outside its folder."""
    directory = directory or checkpoint_dir()
    name, file, sha256 = entry.get("name"), entry.get("file"), entry.get("sha256")
    where = f"{directory / INDEX_FILE}: entry {name!r}"
    plain_name = isinstance(file, str) and file not in ("", ".", "..") and not any(c in file for c in "/\\\0")
    if not plain_name or Path(file).name != file:
        raise ValueError(f"{where} has file {file!r}; an entry's file must be a plain file name inside {directory} "
                         "(no folders, no '..', not absolute)")
    if not isinstance(sha256, str) or not _SHA256.match(sha256.lower()):
        raise ValueError(f"{where} has sha256 {sha256!r}; expected 64 hex digits")
    return directory / file


def _zoo_entry_of(path: Path) -> dict[str, Any] | None:
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
    raise ValueError(f"{path} is a file of the zoo folder {directory} that its index does not list; nothing was "
                     "loaded (bnzoo pretrained list shows the registered checkpoints)")


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
    raise ValueError(_unknown_name_message(name))


def _unknown_name_message(name: Any) -> str:
    names = list_pretrained()
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return (f"unknown pretrained checkpoint {name!r}{hint}. Registered ({len(names)}): {', '.join(names) or 'none'} "
            f"(in {checkpoint_dir() / INDEX_FILE}); a file path or an http(s)/file URL also works")


# -- hashing and downloading ------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_sha256(entry: dict[str, Any], given: str | None, source: str) -> str:
    """The sha256 a zoo file must have: its index entry's (a different ``sha256=`` given for it is refused)."""
    expected = entry["sha256"].lower()
    if given is not None and given.lower() != expected:
        raise ChecksumError(f"sha256={given} was given for {source!r}, whose index entry says {expected}")
    return expected


def _check_sha256(data: bytes, expected: str | None, where: str) -> None:
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ChecksumError(
            f"{where}: sha256 {actual} does not match the expected {expected.lower()}; the file is corrupt or was "
            "modified. Nothing was loaded: delete it and get it again"
        )


def is_url(source: Any) -> bool:
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
    _check_sha256(data, sha256, url)
    atomic_write_bytes(target, data)
    return target


def _locate(
    source: str | os.PathLike[str], sha256: str | None, cache_dir: str | os.PathLike[str] | None
) -> tuple[Path, str | None, dict[str, Any] | None]:
    """(local file, the sha256 it must have or None, its index entry or None) of a name, URL or path."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a registered name, a path or a URL, got {type(source).__name__} {source!r}")
    if isinstance(source, str) and is_pretrained(source):
        entry = pretrained_info(source)
        path = entry_path(entry)
        expected = _expected_sha256(entry, sha256, source)
        if not path.is_file():
            if not entry.get("url"):
                raise FileNotFoundError(f"{path} (checkpoint {source!r} of {checkpoint_dir() / INDEX_FILE}) is missing")
            path = download(entry["url"], expected, cache_dir)
        return path, expected, entry
    if isinstance(source, str) and is_url(source):
        parsed = urllib.parse.urlparse(source)
        entry = _zoo_entry_of(Path(urllib.parse.unquote(parsed.path))) if parsed.scheme == "file" else None
        expected = _expected_sha256(entry, sha256, source) if entry else sha256
        return download(source, expected, cache_dir), expected, entry
    path = Path(source).expanduser()
    if path.is_file():
        entry = _zoo_entry_of(path)
        return path, _expected_sha256(entry, sha256, str(source)) if entry else sha256, entry
    if isinstance(source, str) and os.sep not in source and not Path(source).suffix:
        raise ValueError(_unknown_name_message(source))
    raise FileNotFoundError(f"no checkpoint file {str(path)!r} (and it is no registered name nor URL)")


# -- checkpoints ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A verified, safely loaded checkpoint of a bnzoo task: the task's hyperparameters and its network's
    weights (keys as in the bare network, without the task's ``model.`` prefix)."""

    label: str
    """The name, path or URL it was loaded from."""
    path: Path
    hparams: dict[str, Any]
    state_dict: dict[str, Tensor]
    entry: dict[str, Any] | None = None
    """Its index entry, when it is a registered checkpoint."""

    @property
    def model(self) -> str:
        return self.hparams["model"]

    @property
    def network_options(self) -> dict[str, Any]:
        return network_options(self.hparams)

    def describe(self) -> str:
        return _describe(self.model, self.network_options)


def load_checkpoint(
    source: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    map_location: Any = "cpu",
) -> Checkpoint:
    """Find, verify and safely load a checkpoint: a registered name (verified against the index), a path or an
    ``http(s)``/``file`` URL (verified against ``sha256`` when given). Lightning checkpoints (``.ckpt``) are
    read with ``torch.load(weights_only=True)`` from the verified bytes (so the file that was hashed is the file
    that is loaded); ``.safetensors`` files written by :func:`export_safetensors` carry their hyperparameters
    in their metadata."""
    path, expected, entry = _locate(source, sha256, cache_dir)
    data = path.read_bytes()
    _check_sha256(data, expected, str(path))
    label = str(source)
    if path.suffix == SAFETENSORS_SUFFIX:
        hparams, state = _read_safetensors(data, path)
    else:
        hparams, state = _read_lightning(data, path, map_location)
    check_stored_hyperparameters(hparams, str(path))
    if not isinstance(hparams.get("model"), str):
        raise ValueError(f"{path}: no model name in its hyperparameters; not a checkpoint of a bnzoo task")
    return Checkpoint(label, path, hparams, state, entry)


def _read_lightning(data: bytes, path: Path, map_location: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    checkpoint = safe_torch_load(io.BytesIO(data), map_location=map_location, label=path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise ValueError(f"{path}: not a Lightning checkpoint of a bnzoo task (no state_dict and hyper_parameters)")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not isinstance(checkpoint["hyper_parameters"], dict):
        raise ValueError(f"{path}: its state_dict and hyper_parameters must be dictionaries")
    others = sorted(k for k in state if not k.startswith("model."))
    if others:
        raise ValueError(f"{path}: state_dict entries outside the task's network: {', '.join(others[:5])}")
    return dict(checkpoint["hyper_parameters"]), {k.removeprefix("model."): v for k, v in state.items()}


SAFETENSORS_METADATA_KEY = "bnzoo"


def _read_safetensors(data: bytes, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    metadata, tensors = safe_safetensors_load(data, path)
    try:
        hparams = json.loads(metadata[SAFETENSORS_METADATA_KEY])["hyper_parameters"]
        if not isinstance(hparams, dict):
            raise ValueError("hyper_parameters is not a JSON object")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: no bnzoo metadata in this safetensors file, so its architecture is unknown; load it with "
            "safetensors.torch.load_file() into the network you built"
        ) from err
    return hparams, tensors


def _load_network_state(network: nn.Module, checkpoint: Checkpoint, wanted: str) -> None:
    try:
        network.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as err:
        raise IncompatibleCheckpointError(
            f"checkpoint {checkpoint.label} ({checkpoint.describe()}) does not fit {wanted}: {err}"
        ) from err


def check_compatible(checkpoint: Checkpoint, model: str, options: dict[str, Any]) -> None:
    """Raise :class:`IncompatibleCheckpointError`, naming both, when ``checkpoint`` holds another architecture
    than ``model`` or disagrees with any of ``options`` (except ``norm_options``) it has."""
    differences = option_differences(checkpoint.model, checkpoint.network_options, model, options)
    check_fits(differences, f"checkpoint {checkpoint.label}", checkpoint.describe(), _describe(model, options))


# -- loading tasks and networks ---------------------------------------------------------------------------------
def _task_classes() -> dict[str, type[ClassificationTask]]:
    """The task classes a checkpoint may name (never imported from the name in the file)."""
    from .tasks import ImageClassifier, SequenceClassifier

    return {f"{cls.__module__}.{cls.__name__}": cls for cls in (ImageClassifier, SequenceClassifier)}


def load_pretrained(
    source: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    map_location: Any = "cpu",
) -> ClassificationTask:
    """The LightningModule (:class:`~bnzoo.tasks.ImageClassifier` or :class:`~bnzoo.tasks.SequenceClassifier`) of
    a checkpoint: a registered name (``list_pretrained()``), a ``.ckpt``/``.safetensors`` path, or an
    ``http(s)``/``file`` URL (downloaded into the cache). The file is verified (sha256) and loaded with
    ``weights_only=True`` (see the module doc). The module is returned as built (in training mode), ready for
    ``trainer.test`` or ``.eval()``."""
    checkpoint = load_checkpoint(source, sha256=sha256, cache_dir=cache_dir, map_location=map_location)
    hparams = checkpoint.hparams
    classes = _task_classes()
    inferred = "bnzoo.tasks." + ("SequenceClassifier" if "input_size" in hparams else "ImageClassifier")
    class_path = hparams.get("_class_path") or inferred  # a checkpoint saved outside the CLI has no class path
    if class_path not in classes:
        raise ValueError(f"{checkpoint.path}: unknown task class {class_path!r}; valid: {', '.join(classes)}")
    arguments = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        task = classes[class_path](**arguments)
    except TypeError as err:
        raise ValueError(f"{checkpoint.path}: its hyperparameters do not fit {class_path}: {err}") from err
    _load_network_state(task.model, checkpoint, f"{class_path}({checkpoint.describe()})")
    return task


def default_pretrained(model: str, options: dict[str, Any]) -> str:
    """The registered checkpoint of ``model`` that ``create_model(model, pretrained=True, **options)`` loads: the
    first in the index with that architecture, the norm asked for (else the model's default norm), and every
    other option given equal to its own."""
    norm = options.get("norm", model_options(model).get("norm"))
    wanted = {**options, "norm": norm}
    same_model = [e for e in read_index() if e["model"] == model]
    for entry in same_model:
        stored = entry["create_options"]
        if all(_plain(stored[k]) == _plain(v) for k, v in wanted.items() if k in stored and k not in NOT_IDENTITY):
            return entry["name"]
    available = ", ".join(f"{e['name']} (norm {e['norm']!r})" for e in same_model) or "none"
    raise ValueError(
        f"no pretrained checkpoint of {_describe(model, wanted)}; pretrained checkpoints of {model}: {available}. "
        "Pass pretrained='<name>' (bnzoo.list_pretrained()) or a path/URL"
    )


def pretrained_model(model: str, pretrained: bool | str | os.PathLike[str], options: dict[str, Any]) -> nn.Module:
    """What ``create_model(model, pretrained=..., **options)`` returns: the network with a checkpoint's weights.

    ``pretrained=True`` takes :func:`default_pretrained`; a string is a registered name, a path or a URL.
    Options not given are the checkpoint's (its ``in_chans``, ``num_classes``, model options...); an option given
    that disagrees with the checkpoint, or another architecture, is an :class:`IncompatibleCheckpointError`
    naming both."""
    if pretrained is True:
        source: str | os.PathLike[str] = default_pretrained(model, options)
    elif isinstance(pretrained, (str, os.PathLike)):
        source = pretrained
    else:
        raise TypeError(f"pretrained must be True, False, or a checkpoint name, path or URL; got {pretrained!r}")
    checkpoint = load_checkpoint(source)
    check_compatible(checkpoint, model, options)
    network = create_model(model, **{**checkpoint.network_options, **options})
    _load_network_state(network, checkpoint, _describe(model, options))
    return network


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """``--ckpt_path`` of every ``bnzoo`` subcommand, as a local file Lightning can load.

    A registered name, an ``http(s)``/``file`` URL and a file of the zoo's folder (by path) become their verified
    local file (downloaded into the cache, sha256 checked against the index where there is one, loaded once with
    ``weights_only=True`` and their hyperparameters checked, so an unsafe or tampered file is refused here with a
    clear error); another local path, ``None`` and Lightning's ``best``/``last``/``hpc`` pass through (the CLI
    resolves ``best`` and ``last`` to a file of the run). Refused: ``registry:`` paths (Lightning's model
    registry downloads outside this check) and ``.safetensors`` files (weights only: they load with
    :func:`load_pretrained`). (With a file, LightningCLI builds the model from the checkpoint's hyperparameters,
    so ``--config`` supplies the data and the trainer.)"""
    if ckpt_path is None:
        return None
    name = str(ckpt_path)
    if name == "registry" or name.startswith("registry:"):
        raise ValueError(f"--ckpt_path {name}: Lightning's model registry is not supported (its download is not "
                         "verified); valid: a file, a pretrained name, an http(s)/file URL, last, best or hpc")
    if name.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f"--ckpt_path {name}: a safetensors file holds weights only, not a Lightning checkpoint; "
                         "load it with bnzoo.load_pretrained() or create_model(..., pretrained=path)")
    if name in LIGHTNING_CKPT_PATHS:
        return name
    if is_pretrained(name) or is_url(name):
        return str(load_checkpoint(name).path)
    path = Path(name).expanduser()
    if path.is_file():
        if _zoo_entry_of(path) is not None:
            load_checkpoint(path)  # a zoo file by path: hashed against the index like one by name
        return name
    if os.sep not in name and not path.suffix:  # looks like a name, not a path: say which names exist
        raise ValueError(_unknown_name_message(name))
    raise FileNotFoundError(f"--ckpt_path {name}: no such file (nor a registered name or URL)")


# -- export -----------------------------------------------------------------------------------------------------
def export_safetensors(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a checkpoint's network weights as safetensors (keys of the bare network: ``create_model(...)
    .load_state_dict(safetensors.torch.load_file(path))`` works), with the task's hyperparameters as JSON in
    the metadata (so ``load_pretrained``/``create_model(pretrained=path)`` can rebuild it). Default output:
    ``<checkpoint name>.safetensors`` in the working directory. Written atomically."""
    from safetensors.torch import save as save_safetensors

    checkpoint = load_checkpoint(source, sha256=sha256, cache_dir=cache_dir)
    target = Path(output) if output is not None else Path(checkpoint.path.stem + SAFETENSORS_SUFFIX)
    if target.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"the output file must end in {SAFETENSORS_SUFFIX}, got {str(target)!r}")
    hparams = {k: v for k, v in checkpoint.hparams.items() if k != "_instantiator"}
    bnzoo_metadata = {"source": checkpoint.label, "hyper_parameters": hparams}
    metadata = {"format": "pt", SAFETENSORS_METADATA_KEY: json.dumps(bnzoo_metadata)}
    tensors = {key: value.detach().contiguous() for key, value in checkpoint.state_dict.items()}
    atomic_write_bytes(target, save_safetensors(tensors, metadata))
    return target


# -- the zoo table ----------------------------------------------------------------------------------------------
def zoo_table(entries: list[dict[str, Any]] | None = None) -> str:
    """The README's zoo table (Markdown), rendered from the index: one row per checkpoint."""
    entries = read_index() if entries is None else entries
    rows = [
        "| checkpoint | architecture | norm | dataset | params | test acc. | steps | train time | size | config |",
        "|---|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for e in entries:
        options = ", ".join(f"{k}={_plain(v)}" for k, v in e["model_options"].items())
        architecture = f"{e['model']} ({options})" if options else e["model"]
        train, test = e["train"], e["test"]
        cells = [
            f"`{e['name']}`", architecture, e["norm"], e["dataset"], f"{e['params'] / 1e3:.0f}k",
            f"{100 * test['acc']:.2f}%", f"{train['steps']} ({train['epochs']} ep.)",
            f"{train['wall_time_s'] / 60:.1f} min", f"{e['size_bytes'] / 2**20:.2f} MB",
            f"[{Path(e['config']).name}]({e['config']})",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


# -- command line -----------------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    """``bnzoo export SOURCE [-o OUT.safetensors] [--sha256 HEX]``."""
    parser = TerseArgumentParser(
        prog="bnzoo export", description="Export a checkpoint's network weights to safetensors (with bnzoo metadata).")
    parser.add_argument("source", help="a pretrained name (bnzoo pretrained list), a .ckpt path, or a URL")
    parser.add_argument("-o", "--output", help="the .safetensors file (default: <name>.safetensors here)")
    parser.add_argument("--sha256", help="the expected sha256 of a path or URL")
    args = parser.parse_args(list(argv))
    print(export_safetensors(args.source, args.output, sha256=args.sha256))
    return 0


def verify_entry(entry: dict[str, Any]) -> str | None:
    """Why index entry ``entry`` fails :func:`load_checkpoint` (its file name, presence, sha256, a safe load, its
    hyperparameters), or None when it passes."""
    try:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"an index entry without a name (file {entry.get('file')!r})")
        entry_path(entry)
        load_checkpoint(name)
    except (ValueError, TypeError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def verify_main(names: Sequence[str]) -> int:
    """``bnzoo pretrained verify [NAME ...]``: one line per entry (``ok`` or ``FAILED`` and the reason), every entry
    checked; exit status 1 when any failed."""
    entries = read_index()
    if names:
        by_name = {e.get("name"): e for e in entries}
        entries = [by_name.get(name, {"name": name, "_unknown": True}) for name in names]
    failures = 0
    for index, entry in enumerate(entries):
        label = entry.get("name") if isinstance(entry.get("name"), str) else f"entry #{index}"
        reason = _unknown_name_message(label) if entry.get("_unknown") else verify_entry(entry)
        failures += reason is not None
        print(f"ok      {label}" if reason is None else f"FAILED  {label}: {reason}")
    print(f"{len(entries) - failures} of {len(entries)} checkpoints verified")
    return 1 if failures else 0


def pretrained_main(argv: Sequence[str]) -> int:
    """``bnzoo pretrained list [PATTERN] | info NAME | verify [NAME ...] | table``."""
    parser = TerseArgumentParser(prog="bnzoo pretrained", description="The pretrained checkpoints of the zoo.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,info,verify,table}")
    commands.add_parser("list", help="names, test accuracy and size").add_argument("pattern", nargs="?", default="*")
    commands.add_parser("info", help="a checkpoint's index entry as JSON").add_argument("name")
    commands.add_parser("verify", help="check files against their sha256 and load them safely").add_argument(
        "names", nargs="*")
    commands.add_parser("table", help="the README's zoo table (Markdown)")
    args = parser.parse_args(list(argv))
    if args.command == "list":
        for name in list_pretrained(args.pattern):
            entry = pretrained_info(name)
            print(f"{name:45s} test acc {100 * entry['test']['acc']:6.2f}%  {entry['size_bytes'] / 2**20:5.2f} MB")
    elif args.command == "info":
        print(json.dumps(pretrained_info(args.name), indent=2))
    elif args.command == "verify":
        return verify_main(args.names)
    else:
        print(zoo_table(), end="")
    return 0
