"""The CLI's checks of its input: the ``--config`` files (YAML mappings; a later file that replaces the callbacks
of an earlier one is warned about), a config against a checkpoint, the trainer settings Lightning would accept
silently."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ..zoo.compatibility import check_fits, data_differences, describe, network_options, task_differences
from .errors import UsageError


# -- the config and a checkpoint ------------------------------------------------------------------------------
def as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return dict(value.as_dict() if hasattr(value, "as_dict") else value)


def check_config_files(argv: Sequence[str]) -> None:
    """Raise a :class:`~bnzoo.cli.errors.UsageError` naming a ``--config`` file that is no YAML mapping (jsonargparse's
    own message says what is wrong, not in which file)."""
    argv = list(argv)
    paths = [  # in the order given: a later file overrides an earlier one
        argv[i + 1] if a == "--config" else a.split("=", 1)[1]
        for i, a in enumerate(argv)
        if (a == "--config" and i + 1 < len(argv)) or a.startswith("--config=")
    ]
    earlier: dict[str, tuple[str, list[str]]] = {}  # list key -> (file, class names) of the last file setting it
    for path in filter(os.path.isfile, paths):
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"--config {path}: not valid YAML ({problem}{where})") from err
        if content is not None and not isinstance(content, dict):
            raise UsageError(
                f"--config {path}: a config is a mapping of sections (trainer:, model:, data:, ...), "
                f"not a {type(content).__name__}"
            )
        _warn_replaced_lists(path, content or {}, earlier)


#: the list options a later ``--config`` replaces unless it appends with ``<key>+:``
APPENDABLE = ("callbacks", "plugins")


def _warn_replaced_lists(path: str, content: Mapping[str, Any], earlier: dict[str, tuple[str, list[str]]]) -> None:
    """Warn when ``path`` sets ``trainer.callbacks`` (or ``plugins``) that an earlier ``--config`` set: jsonargparse
    replaces the list, so the earlier file's entries are dropped; ``callbacks+:`` appends."""
    trainer = content.get("trainer") if isinstance(content.get("trainer"), Mapping) else {}
    for key in APPENDABLE:
        names = _class_names(trainer.get(key))
        if key in trainer and key in earlier and earlier[key][1]:
            before, dropped = earlier[key]
            warnings.warn(
                f"--config {path}: trainer.{key} replaces those of {before} ({', '.join(dropped)}); write "
                f"`{key}+:` in {path} (or --trainer.{key}+=...) to add to them",
                UserWarning,
                stacklevel=2,
            )
        if key in trainer:
            earlier[key] = (path, names)
        elif f"{key}+" in trainer and key in earlier:
            earlier[key] = (earlier[key][0], earlier[key][1] + _class_names(trainer[f"{key}+"]))


def _class_names(entries: Any) -> list[str]:
    entries = entries if isinstance(entries, list) else [] if entries is None else [entries]
    return [str(e.get("class_path", "?")) if isinstance(e, Mapping) else str(e) for e in entries]


def model_hparams(config: Any) -> dict[str, Any]:
    """The task hyperparameters a config builds: ``model.init_args`` and ``dict_kwargs`` (where LightningCLI puts
    a checkpoint's), with ``_class_path``; without the arguments linked from the data module (their values in the
    parsed config are placeholders: the data module's class decides them)."""
    model = config.get("model") or {}
    hparams = {**as_dict(model.get("init_args")), **as_dict(model.get("dict_kwargs"))}
    for name in LINKED_DATA_ATTRIBUTES:
        if name not in as_dict(model.get("dict_kwargs")):
            hparams.pop(name, None)
    if model.get("class_path"):
        hparams["_class_path"] = model.get("class_path")
    return hparams


def data_hparams(config: Any) -> dict[str, Any]:
    data = config.get("data") or {}
    return {"_class_path": data.get("class_path"), **as_dict(data.get("init_args"))}


def config_differences(checkpoint: Mapping[str, Any], config: Any) -> list[str]:
    """How a loaded Lightning checkpoint differs from what a parsed config builds (:mod:`bnzoo.zoo.compatibility`:
    the task, its network, its data)."""
    return task_differences(checkpoint.get("hyper_parameters") or {}, model_hparams(config)) + data_differences(
        checkpoint.get("datamodule_hyper_parameters") or {}, data_hparams(config)
    )


def check_config_fits(checkpoint: Mapping[str, Any], config: Any, where: str) -> None:
    """Raise an :class:`~bnzoo.zoo.compatibility.IncompatibleCheckpointError` naming both when the checkpoint at
    ``where`` holds another task, network or data than ``config`` builds."""
    stored, wanted = checkpoint.get("hyper_parameters") or {}, model_hparams(config)
    check_fits(
        config_differences(checkpoint, config), where,
        describe(stored.get("model"), network_options(stored)),
        f"what the config builds, {describe(wanted.get('model'), network_options(wanted))}",
        "Use the checkpoint's config (for the zoo: configs/pretrained/<name>.yaml) or set --model.init_args.* to match",
    )  # fmt: skip


# -- the trainer ----------------------------------------------------------------------------------------------
_GPU_ACCELERATORS = ("gpu", "cuda", "mps")


def _available_accelerators() -> list[str]:
    available = ["cpu", "auto"]
    if torch.cuda.is_available():
        available += ["gpu", "cuda"]
    if torch.backends.mps.is_available():
        available += ["gpu", "mps"]
    return list(dict.fromkeys(available))


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the option and what is valid for trainer settings Lightning would accept
    silently (``max_epochs=0``) or refuse with a traceback or an unhelpful message (``max_epochs=-5``,
    ``devices=0``, ``accelerator=gpu`` without a GPU)."""
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) and (value == -1 or value >= 1)):
            raise ValueError(f"--trainer.{key} {value!r}: must be an int >= 1, or -1 for no limit (0 trains nothing)")
    devices = trainer.get("devices")
    valid_devices = (
        devices in ("auto", -1, "-1")
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
        or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit() and devices.strip() != "0")
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    )
    if devices is not None and not valid_devices:
        raise ValueError(f"--trainer.devices {devices!r}: valid: auto, -1 (all), a count >= 1, or a list of indices")
    accelerator = trainer.get("accelerator")
    available = _available_accelerators()
    if isinstance(accelerator, str) and accelerator in _GPU_ACCELERATORS and accelerator not in available:
        raise ValueError(
            f"--trainer.accelerator {accelerator}: no {accelerator.upper()} device on this machine (a GPU preset such "
            f"as configs/trainer/gpu.yaml needs one); valid here: {', '.join(available)}"
        )


LINKED_DATA_ATTRIBUTES = ("num_classes", "in_chans", "image_size", "input_size", "max_length")
