"""What a ``bnzoo fit|validate|test`` run logs as its hyperparameters (TensorBoard's hparams, ``hparams.yaml``): the
parsed config, flat and plain -- the task's settings with the optimizer and scheduler that actually ran
(:func:`bnzoo.tasks.run_hparams.task_run_hparams`: ``--optimizer AdamW`` gives ``optimizer: AdamW`` and AdamW's
arguments, not the task's unused SGD settings), the seed, the data module and its options, the trainer's limits
and the callbacks -- and never LightningCLI's ``_class_path`` / ``_instantiator``.

``--lr_scheduler`` without ``--optimizer`` is refused (:func:`check_optimizer_config`): LightningCLI would ignore
the scheduler silently and the task's own SGD and warm-up schedule would run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..tasks.run_hparams import flatten, short_class_name, task_run_hparams
from .config import as_dict

__all__ = ["TRAINER_HPARAMS", "check_optimizer_config", "run_hparams"]

#: the trainer settings a run logs (the rest are engineering: progress bars, logging intervals, ...)
TRAINER_HPARAMS = (
    "max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
    "precision", "accelerator", "devices", "num_nodes", "strategy", "sync_batchnorm", "deterministic",
)  # fmt: skip


def check_optimizer_config(config: Mapping[str, Any]) -> None:
    """Raise a ValueError for ``--lr_scheduler`` without ``--optimizer`` (see the module doc)."""
    if config.get("lr_scheduler") and not config.get("optimizer"):
        task_run_hparams({}, None, config.get("lr_scheduler"))  # raises, with the one message


def _names(entries: Any) -> list[str]:
    """The class names of a list of ``{class_path, init_args}`` (callbacks, plugins), or of one."""
    if not entries:
        return []
    names = []
    for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
        entry = entry.as_dict() if hasattr(entry, "as_dict") else entry
        if isinstance(entry, Mapping):
            names.append(short_class_name(entry.get("class_path")))
        else:  # a string (a plugin's name) or an instance
            names.append(entry if isinstance(entry, str) else type(entry).__name__)
    return names


def run_hparams(config: Mapping[str, Any], task_hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The flat, plain hyperparameters of a CLI run: ``config`` is the subcommand's parsed config, ``task_hparams``
    the built task's ``hparams`` (with the values linked from the data module)."""
    check_optimizer_config(config)
    logged = task_run_hparams(dict(task_hparams), config.get("optimizer") or None, config.get("lr_scheduler") or None)
    model = config.get("model") or {}
    if model.get("class_path"):
        logged["task"] = short_class_name(model.get("class_path"))
    logged["seed"] = config.get("seed_everything")
    data = config.get("data") or {}
    if data.get("class_path"):
        logged["data"] = short_class_name(data.get("class_path"))
    logged.update(flatten(as_dict(data.get("init_args")), "data/"))
    trainer = as_dict(config.get("trainer"))
    for key in TRAINER_HPARAMS:
        value = trainer.get(key)
        if isinstance(value, Mapping) or hasattr(value, "as_dict"):  # a strategy given as a class
            value = short_class_name(as_dict(value).get("class_path"))
        elif value is not None and not isinstance(value, (bool, int, float, str, list)):
            value = short_class_name(type(value))
        logged[f"trainer/{key}"] = value
    logged["trainer/callbacks"] = ", ".join(_names(trainer.get("callbacks"))) or "none"
    logged["trainer/plugins"] = ", ".join(_names(trainer.get("plugins"))) or "none"
    if config.get("ckpt_path"):
        logged["ckpt_path"] = str(config.get("ckpt_path"))
    return logged
