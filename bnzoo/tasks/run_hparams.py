"""The hyperparameters a run logs (TensorBoard's hparams, ``hparams.yaml``): one flat dict of plain values that
says what the run actually used.

A task's own hyperparameters hold SGD's and the warm-up schedule's settings whether or not they are used, and
LightningCLI adds its bookkeeping (``_class_path``, ``_instantiator``). :func:`task_run_hparams` turns them into
what ran: ``optimizer`` (the class name) with ``optimizer/<argument>`` columns, ``lr_scheduler`` likewise, the
task's other settings (``model``, ``norm``, ``norm_options/momentum``, ...), never a ``_``-prefixed key. When
``--optimizer`` replaced the task's SGD, SGD's settings (``lr``, ``momentum``, ``weight_decay``, ...) are left out,
and when the optimizer came without ``--lr_scheduler`` there is no schedule (``lr_scheduler: none``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEDULE_HPARAMS", "SGD_HPARAMS", "flatten", "short_class_name", "task_run_hparams"]

#: the task hyperparameters that configure its own SGD (unused when ``--optimizer`` replaces it)
SGD_HPARAMS = ("lr", "momentum", "weight_decay", "nesterov", "decay_norm_and_bias")
#: the task hyperparameters that configure its own warm-up schedule
SCHEDULE_HPARAMS = ("schedule", "warmup_steps", "milestones", "gamma")


def short_class_name(class_path: Any) -> str:
    """``torch.optim.AdamW`` -> ``AdamW``; a class -> its name."""
    if isinstance(class_path, type):
        return class_path.__name__
    return str(class_path).rsplit(".", 1)[-1]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    return str(value)


def flatten(values: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "_c": 2}`` -> ``{"<prefix>a/b": 1}``: nested mappings joined with ``/``, keys starting with
    ``_`` dropped, values plain (lists kept; other objects as their string)."""
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if str(key).startswith("_"):
            continue
        if hasattr(value, "as_dict"):  # a jsonargparse Namespace
            value = value.as_dict()
        if isinstance(value, Mapping):
            if "class_path" in value:  # a class given as {class_path, init_args}
                flat[f"{prefix}{key}"] = short_class_name(value["class_path"])
                flat.update(flatten(value.get("init_args"), f"{prefix}{key}/"))
            else:
                flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def _class_and_args(spec: Any) -> tuple[str, dict[str, Any]]:
    spec = spec.as_dict() if hasattr(spec, "as_dict") else dict(spec)
    return short_class_name(spec.get("class_path")), dict(spec.get("init_args") or {})


def task_run_hparams(hparams: Mapping[str, Any], optimizer: Any = None, lr_scheduler: Any = None) -> dict[str, Any]:
    """The flat, plain hyperparameters of a task run: ``hparams`` (a task's ``self.hparams``) with the optimizer
    and schedule that ran. ``optimizer`` / ``lr_scheduler``: LightningCLI's ``{class_path, init_args}`` of
    ``--optimizer`` / ``--lr_scheduler`` (None: the task's own SGD and warm-up schedule)."""
    if optimizer is None and lr_scheduler is not None:
        raise ValueError(
            "--lr_scheduler without --optimizer: the task's own SGD and warm-up schedule would run and the scheduler "
            "be ignored (LightningCLI applies --lr_scheduler only with --optimizer); give --optimizer too, or set "
            "the task's schedule with --model.init_args.schedule / warmup_steps / milestones / gamma"
        )
    own = {k: v for k, v in hparams.items() if k not in SGD_HPARAMS + SCHEDULE_HPARAMS}
    out = flatten(own)
    if optimizer is None:
        out["optimizer"] = "SGD"
        out.update({f"optimizer/{k}": _plain(hparams[k]) for k in SGD_HPARAMS if k in hparams})
        schedule = hparams.get("schedule", "cosine")
        out["lr_scheduler"] = schedule
        out["lr_scheduler/warmup_steps"] = hparams.get("warmup_steps", 0)
        if schedule == "step":
            out["lr_scheduler/milestones"] = _plain(hparams.get("milestones") or [0.5, 0.75])
            out["lr_scheduler/gamma"] = hparams.get("gamma", 0.1)
        return out
    name, arguments = _class_and_args(optimizer)
    out["optimizer"] = name
    out.update(flatten(arguments, "optimizer/"))
    if lr_scheduler is None:
        out["lr_scheduler"] = "none"
    else:
        name, arguments = _class_and_args(lr_scheduler)
        out["lr_scheduler"] = name
        out.update(flatten(arguments, "lr_scheduler/"))
    return out
