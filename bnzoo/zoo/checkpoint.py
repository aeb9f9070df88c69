"""A zoo checkpoint, verified and loaded: :class:`Checkpoint` (its hyperparameters and its network's weights)
from a name, path or URL (:func:`load_checkpoint`); the one check that it holds the network asked for
(:func:`check_compatible`); and ``--ckpt_path`` of every ``bnzoo`` subcommand as a verified local file
(:func:`resolve_ckpt_path`). The rules every load follows are in :mod:`bnzoo.zoo`."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..io import safe_safetensors_load, safe_torch_load
from ..models.timm_models import without_initial_weights
from .compatibility import IncompatibleCheckpointError, check_fits, describe, network_options, option_differences
from .fetch import LIGHTNING_CKPT_PATHS, check_sha256, is_url, locate
from .index import SAFETENSORS_SUFFIX, is_pretrained, unknown_name_message, zoo_entry_of
from .trust import check_stored_hyperparameters

if TYPE_CHECKING:
    pass

__all__ = [
    "SAFETENSORS_METADATA_KEY",
    "TASK_CLASS_KEY",
    "Checkpoint",
    "check_compatible",
    "load_checkpoint",
    "load_network_state",
    "resolve_ckpt_path",
]


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
        return describe(self.model, self.network_options)


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
    path, expected, entry = locate(source, sha256, cache_dir)
    data = path.read_bytes()
    check_sha256(data, expected, str(path))
    label = str(source)
    if path.suffix == SAFETENSORS_SUFFIX:
        hparams, state = _read_safetensors(data, path)
    else:
        hparams, state = _read_lightning(data, path, map_location)
    check_stored_hyperparameters(hparams, str(path))
    hparams = without_initial_weights(hparams)  # the checkpoint's own weights replace timm's pretrained ones
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
    hparams = dict(checkpoint["hyper_parameters"])
    if "_class_path" not in hparams and isinstance(checkpoint.get(TASK_CLASS_KEY), str):
        hparams["_class_path"] = checkpoint[TASK_CLASS_KEY]  # a task saved outside the CLI records its class
    return hparams, {k.removeprefix("model."): v for k, v in state.items()}


SAFETENSORS_METADATA_KEY = "bnzoo"

#: the key under which a bnzoo task saves its own class path in a Lightning checkpoint (LightningCLI saves it in
#: the hyperparameters as ``_class_path``; a task trained from Python has only this)
TASK_CLASS_KEY = "bnzoo_task"


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


def load_network_state(network: nn.Module, checkpoint: Checkpoint, wanted: str) -> None:
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
    check_fits(differences, f"checkpoint {checkpoint.label}", checkpoint.describe(), describe(model, options))


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
        raise ValueError(
            f"--ckpt_path {name}: Lightning's model registry is not supported (its download is not "
            "verified); valid: a file, a pretrained name, an http(s)/file URL, last, best or hpc"
        )
    if name.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(
            f"--ckpt_path {name}: a safetensors file holds weights only, not a Lightning checkpoint; "
            "load it with bnzoo.load_pretrained() or create_model(..., pretrained=path)"
        )
    if name in LIGHTNING_CKPT_PATHS:
        return name
    if is_pretrained(name) or is_url(name):
        return str(load_checkpoint(name).path)
    path = Path(name).expanduser()
    if path.is_file():
        if zoo_entry_of(path) is not None:
            load_checkpoint(path)  # a zoo file by path: hashed against the index like one by name
        return name
    if os.sep not in name and not path.suffix:  # looks like a name, not a path: say which names exist
        raise ValueError(unknown_name_message(name))
    raise FileNotFoundError(f"--ckpt_path {name}: no such file (nor a registered name or URL)")
