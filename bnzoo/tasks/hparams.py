"""A task's hyperparameters checked before anything is built: the model, the norm kind and their options, the
schedule, the optimizer's numbers and the ``torch.compile`` options -- each error names the bad value and what is
valid. ``bnzoo fit`` runs :func:`check_task_hparams` on the config before Lightning builds the task; the task
runs it again on its arguments."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..models.registry import check_model_options
from ..models.registry import model_options as options_of_model
from ..norms.factory import check_norm_config
from ..optim import SCHEDULES
from .compiling import check_compile_options

__all__ = ["check_model_config", "check_task_hparams"]


def check_model_config(
    model: str | None, norm: str | None, norm_options: dict[str, Any] | None, model_options: dict[str, Any] | None
) -> None:
    """Raise a ValueError naming the bad value and the valid choices for an unknown model, norm kind, norm
    option or model option -- without building anything. ``model_options.pretrained`` is refused: a task's
    weights come from a checkpoint (``--ckpt_path``, :func:`bnzoo.load_pretrained`), never from a download or file
    its options name."""
    if model_options and "pretrained" in model_options:
        own = sorted(set(options_of_model(model)) - {"norm", "norm_options", "num_classes"}) if model else []
        raise ValueError(
            f"model_options.pretrained={model_options['pretrained']!r} is not an option of a task: its weights come "
            "from a checkpoint (--ckpt_path, or bnzoo.load_pretrained() then fit); valid model options: "
            + (", ".join(own) or "those of the model")
        )
    if model is not None:
        check_model_options(model, model_options or {})
    if norm is not None:
        check_norm_config(norm, norm_options or {})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: the task's numeric hyperparameters: (test, what is valid)
_NUMERIC_RULES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: _number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "weight_decay": (lambda v: _number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "gamma": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "aux_loss_weight": (lambda v: _number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "warmup_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
    "num_classes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "milestones": (
        lambda v: (
            v is None
            or (
                isinstance(v, (list, tuple))
                and all(_number(m) and 0 < m < 1 for m in v)
                and all(a < b for a, b in zip(v, v[1:], strict=False))
            )
        ),
        "null or increasing fractions of training in (0, 1)",
    ),
}


def check_task_hparams(hparams: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the first bad task hyperparameter of ``hparams`` (any subset of a task's
    arguments), its value and what is valid: the model, norm and their options (:func:`check_model_config`), the
    schedule, the optimizer's numbers (a learning rate of ``nan`` or ``-1`` would otherwise train an epoch, or
    fail deep in torch) and ``compile`` / ``compile_options`` (:func:`~bnzoo.tasks.compiling.check_compile_options`:
    checked also where ``compile`` is false, so that a config that switches it on later fails now)."""
    check_model_config(*(hparams.get(k) for k in ("model", "norm", "norm_options", "model_options")))
    if "schedule" in hparams and hparams["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {hparams['schedule']!r}; valid schedules: {', '.join(SCHEDULES)}")
    for name, (valid, rule) in _NUMERIC_RULES.items():
        if name in hparams and not valid(hparams[name]):
            raise ValueError(f"{name} must be {rule}, got {hparams[name]!r}")
    if "compile_options" in hparams:
        check_compile_options(hparams["compile_options"])
