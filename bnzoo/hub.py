"""Pretrained checkpoints: list them, verify them, download them, load them -- safely.

    >>> import bnzoo
    >>> bnzoo.list_pretrained("fashion_mnist-resnet20-*")
    ['fashion_mnist-resnet20-bn', 'fashion_mnist-resnet20-none', 'fashion_mnist-resnet20-renorm']
    >>> task = bnzoo.load_pretrained("fashion_mnist-resnet20-bn")       # the LightningModule
    >>> net = bnzoo.create_model("resnet20", norm="bn", pretrained=True)  # the bare network

The zoo is ``checkpoints/index.json`` and the files it lists (``BNZOO_CHECKPOINT_DIR`` points elsewhere). Every
load follows the same three rules:

1. **Verify before loading.** A registered checkpoint's bytes are hashed and compared with the sha256 in the
   index before anything is unpickled; a mismatch is a :class:`ChecksumError` naming the file. A path or URL
   given by the user is verified against ``sha256=`` when given.
2. **Never run code from a file.** The verified bytes go to ``torch.load(weights_only=True)``: tensors and
   plain types only (hyperparameters are plain types for this reason). A file whose pickle would import or call
   anything is refused with an :class:`UnsafeCheckpointError`, and nothing in it runs. The task class is
   chosen from bnzoo's own tasks, never imported from a name in the file.
3. **Refuse a checkpoint of another network.** Asking for one architecture or norm and getting a checkpoint of
   another is an :class:`IncompatibleCheckpointError` naming both (Batch Renorm keeps BatchNorm's state-dict
   keys, so a bn checkpoint would otherwise load silently into a renorm network).

URLs (``http``, ``https``, ``file``) are downloaded with ``urllib`` into a cache directory (``cache_dir=``, else
``$BNZOO_CACHE_DIR``, else ``<torch.hub.get_dir()>/bnzoo``), verified (when a sha256 is known) before they are
written, and written atomically: the cache never holds a partial file, nor one that failed its sha256. An index
entry may carry a ``url``: when its file is not in the folder it is downloaded from there, and verified against
the entry's sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import pickle
import sys
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

from .checkpoint_io import atomic_write_bytes, safe_torch_load
from .models.registry import create_model, model_options

if TYPE_CHECKING:
    from .tasks import ClassificationTask

__all__ = [
    "CHECKPOINT_SUFFIX",
    "INDEX_FORMAT",
    "Checkpoint",
    "ChecksumError",
    "IncompatibleCheckpointError",
    "UnsafeCheckpointError",
    "checkpoint_dir",
    "download",
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

#: hyperparameters of a task that are also options of its network (the task passes them to create_model)
NETWORK_HPARAMS = ("norm", "norm_options", "num_classes", "in_chans", "image_size", "input_size")

#: network options a checkpoint and the network it is loaded into may disagree on (every other option they both
#: have must be equal): norm options such as eps or momentum change no weight
_NOT_IDENTITY = ("norm_options",)

#: Lightning's own values of ``--ckpt_path`` (passed through untouched by :func:`resolve_ckpt_path`)
LIGHTNING_CKPT_PATHS = ("best", "last", "hpc", "registry")


class ChecksumError(ValueError):
    """A file's sha256 differs from the expected one (corrupt, truncated or modified)."""


class UnsafeCheckpointError(ValueError):
    """``torch.load(weights_only=True)`` refused a file: its pickle would import or call something."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint holds another architecture, norm or shape than the network it was asked for."""


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
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: index format {index.get('format')!r}, expected {INDEX_FORMAT}")
    return list(index["checkpoints"])


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
    return sorted(e["name"] for e in read_index() if fnmatch.fnmatchcase(e["name"], pattern))


def is_pretrained(name: Any) -> bool:
    """Whether ``name`` is a registered checkpoint's name."""
    return isinstance(name, str) and any(e["name"] == name for e in read_index())


def pretrained_info(name: str) -> dict[str, Any]:
    """The index entry of the registered checkpoint ``name``: architecture, options, dataset, config, training
    steps and time, test accuracy, sha256, size. An unknown name is a ValueError with the closest names."""
    for entry in read_index():
        if entry["name"] == name:
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
        expected = entry["sha256"]
        if sha256 is not None and sha256.lower() != expected:
            raise ChecksumError(f"sha256={sha256} was given for {source!r}, whose index entry says {expected}")
        path = checkpoint_dir() / entry["file"]
        if not path.is_file():
            if not entry.get("url"):
                raise FileNotFoundError(f"{path} (checkpoint {source!r} of {checkpoint_dir() / INDEX_FILE}) is missing")
            path = download(entry["url"], expected, cache_dir)
        return path, expected, entry
    if isinstance(source, str) and is_url(source):
        return download(source, sha256, cache_dir), sha256, None
    path = Path(source).expanduser()
    if path.is_file():
        return path, sha256, None
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


def network_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` options of the network a task with hyperparameters ``hparams`` built: the task's
    network hyperparameters plus its ``model_options``."""
    options = {key: hparams[key] for key in NETWORK_HPARAMS if key in hparams}
    if "norm_options" in options and options["norm_options"] is None:
        options["norm_options"] = {}
    options.update(hparams.get("model_options") or {})
    return options


def _plain(value: Any) -> Any:
    """``value`` as JSON has it (tuples become lists), for comparing options from YAML, JSON and Python."""
    return json.loads(json.dumps(value))


def _describe(model: str, options: dict[str, Any]) -> str:
    extra = {k: v for k, v in options.items() if k not in ("norm", "norm_options")}
    details = ", ".join(f"{k}={_plain(v)!r}" for k, v in sorted(extra.items()))
    return f"{model} with norm {options.get('norm', model_options(model).get('norm'))!r}" + (
        f" ({details})" if details else "")


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
    if not isinstance(hparams.get("model"), str):
        raise ValueError(f"{path}: no model name in its hyperparameters; not a checkpoint of a bnzoo task")
    return Checkpoint(label, path, hparams, state, entry)


def _read_lightning(data: bytes, path: Path, map_location: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        checkpoint = safe_torch_load(io.BytesIO(data), map_location=map_location)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith(("Trying to load", "Unsupported"))), lines[-1])
        raise UnsafeCheckpointError(
            f"{path}: refused to load: torch.load(weights_only=True) found more than tensors and plain types "
            f"({reason.rstrip('.')}). bnzoo never unpickles code; if you trust this file, load it yourself"
        ) from err
    except RuntimeError as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({str(err).splitlines()[0]})") from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise ValueError(f"{path}: not a Lightning checkpoint of a bnzoo task (no state_dict and hyper_parameters)")
    state = checkpoint["state_dict"]
    others = sorted(k for k in state if not k.startswith("model."))
    if others:
        raise ValueError(f"{path}: state_dict entries outside the task's network: {', '.join(others[:5])}")
    return dict(checkpoint["hyper_parameters"]), {k.removeprefix("model."): v for k, v in state.items()}


SAFETENSORS_METADATA_KEY = "bnzoo"


def _read_safetensors(data: bytes, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load as load_safetensors

    header_size = int.from_bytes(data[:8], "little")  # the format: u64 header size, JSON header, tensor bytes
    try:
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        hparams = json.loads(metadata[SAFETENSORS_METADATA_KEY])["hyper_parameters"]
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"{path}: no bnzoo metadata in this safetensors file, so its architecture is unknown; load it with "
            "safetensors.torch.load_file() into the network you built"
        ) from err
    return hparams, load_safetensors(data)


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
    stored = checkpoint.network_options
    differences = [f"model: checkpoint {checkpoint.model!r}, asked for {model!r}"] if checkpoint.model != model else []
    for key, value in sorted(options.items()):
        if key in stored and key not in _NOT_IDENTITY and _plain(stored[key]) != _plain(value):
            differences.append(f"{key}: checkpoint {_plain(stored[key])!r}, asked for {_plain(value)!r}")
    if differences:
        raise IncompatibleCheckpointError(
            f"checkpoint {checkpoint.label} holds {checkpoint.describe()}, not {_describe(model, options)}: "
            + "; ".join(differences)
        )


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
        if all(_plain(stored[k]) == _plain(v) for k, v in wanted.items() if k in stored and k not in _NOT_IDENTITY):
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
    """``--ckpt_path`` of ``bnzoo validate|test|predict``: a registered name or an ``http(s)``/``file`` URL becomes
    its verified local file (sha256 checked, loaded once with ``weights_only=True`` to refuse unsafe files with a
    clear error); a local path, Lightning's own values (``best``, ``last``, ...) and ``None`` pass through. (With a
    file, LightningCLI builds the model from the checkpoint's hyperparameters, so ``--config`` supplies the data
    and the trainer.)"""
    if ckpt_path is None or is_pretrained(ckpt_path) or is_url(ckpt_path):
        return ckpt_path if ckpt_path is None else str(load_checkpoint(ckpt_path).path)
    name = str(ckpt_path)
    if name in LIGHTNING_CKPT_PATHS or name.startswith("registry:") or Path(name).expanduser().exists():
        return ckpt_path
    if os.sep not in name and not Path(name).suffix:  # looks like a name, not a path: say which names exist
        raise ValueError(_unknown_name_message(name))
    return ckpt_path


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
    parser = argparse.ArgumentParser(
        prog="bnzoo export", description="Export a checkpoint's network weights to safetensors (with bnzoo metadata).")
    parser.add_argument("source", help="a pretrained name (bnzoo pretrained list), a .ckpt path, or a URL")
    parser.add_argument("-o", "--output", help="the .safetensors file (default: <name>.safetensors here)")
    parser.add_argument("--sha256", help="the expected sha256 of a path or URL")
    args = parser.parse_args(list(argv))
    try:
        path = export_safetensors(args.source, args.output, sha256=args.sha256)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"bnzoo export: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def pretrained_main(argv: Sequence[str]) -> int:
    """``bnzoo pretrained list [PATTERN] | info NAME | verify [NAME ...] | table``."""
    parser = argparse.ArgumentParser(prog="bnzoo pretrained", description="The pretrained checkpoints of the zoo.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="names, test accuracy and size").add_argument("pattern", nargs="?", default="*")
    commands.add_parser("info", help="a checkpoint's index entry as JSON").add_argument("name")
    commands.add_parser("verify", help="check files against their sha256 and load them safely").add_argument(
        "names", nargs="*")
    commands.add_parser("table", help="the README's zoo table (Markdown)")
    args = parser.parse_args(list(argv))
    try:
        if args.command == "list":
            for name in list_pretrained(args.pattern):
                entry = pretrained_info(name)
                print(f"{name:45s} test acc {100 * entry['test']['acc']:6.2f}%  {entry['size_bytes'] / 2**20:5.2f} MB")
        elif args.command == "info":
            print(json.dumps(pretrained_info(args.name), indent=2))
        elif args.command == "verify":
            failures = 0
            for name in args.names or list_pretrained():
                try:
                    load_checkpoint(name)
                    print(f"ok      {name}")
                except (ValueError, FileNotFoundError) as err:
                    failures += 1
                    print(f"FAILED  {name}: {err}")
            return 1 if failures else 0
        else:
            print(zoo_table(), end="")
    except ValueError as err:
        print(f"bnzoo pretrained: error: {err}", file=sys.stderr)
        return 2
    return 0
