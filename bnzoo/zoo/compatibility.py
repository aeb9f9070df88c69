"""When a checkpoint fits what was asked for: the one comparison behind every "this checkpoint holds another
network" refusal (``create_model(pretrained=...)``, ``bnzoo test|validate|predict --ckpt_path``, ``bnzoo
recalibrate``, and resuming a run with ``bnzoo fit --ckpt_path``).

A checkpoint and a request are *compatible* when everything that gives the weights their meaning agrees:

* the architecture (``model``) and the task class (``_class_path``, when both have one);
* every network option: the norm kind (``norm``), the model's own options (``model_options``, with the model's
  defaults filled in on both sides, so ``{}`` and the defaults spelled out agree), and the input/output options
  (``num_classes``, ``in_chans``, ``image_size``, ``input_size``) where both state them;
* for a data module (resuming a run): its class and the options that change what an input means
  (:data:`DATA_IDENTITY`: ``dataset``, ``mode``, ``normalization``).

Not compared, because they change no weight's meaning: ``norm_options`` (eps, momentum, Batch Renorm's
``r_max``/``d_max``), the optimizer and schedule (``lr``, ``weight_decay``, ...), batch size, data paths,
augmentation and every trainer setting (so a resumed run may train longer, or on other hardware).

Batch Renorm keeps BatchNorm's state-dict keys, so a ``bn`` checkpoint would otherwise load silently into a
``renorm`` network: this check, not ``load_state_dict``, is what tells them apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..models.registry import model_options

__all__ = [
    "DATA_IDENTITY",
    "NETWORK_HPARAMS",
    "IncompatibleCheckpointError",
    "check_fits",
    "data_differences",
    "describe",
    "network_options",
    "option_differences",
    "plain",
    "task_differences",
]

#: hyperparameters of a task that are also options of its network (the task passes them to create_model)
NETWORK_HPARAMS = ("norm", "norm_options", "num_classes", "in_chans", "image_size", "input_size")

#: network options a checkpoint and the network it is loaded into may disagree on: norm options such as eps or
#: momentum change no weight
NOT_IDENTITY = ("norm_options",)

#: data-module options that change what an input means (and so what the weights mean)
DATA_IDENTITY = ("dataset", "mode", "normalization")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint holds another architecture, norm, shape or data than what it was asked for."""


def plain(value: Any) -> Any:
    """``value`` as JSON has it (tuples become lists), for comparing options from YAML, JSON and Python."""
    return json.loads(json.dumps(value, default=str))


def network_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The ``create_model`` options of the network a task with hyperparameters ``hparams`` built: the task's
    network hyperparameters plus its ``model_options``."""
    options = {key: hparams[key] for key in NETWORK_HPARAMS if key in hparams}
    if "norm_options" in options and options["norm_options"] is None:
        options["norm_options"] = {}
    options.update(hparams.get("model_options") or {})
    return options


def _own_defaults(model: Any) -> dict[str, Any]:
    """The defaults of ``model``'s own options (not the norm and the input/output options); {} for an unknown
    model (its name is then the difference reported)."""
    try:
        defaults = model_options(model)
    except ValueError:
        return {}
    return {k: v for k, v in defaults.items() if k not in NETWORK_HPARAMS}


def describe(model: Any, options: Mapping[str, Any]) -> str:
    """``resnet20 with norm 'bn' (width=0.5)``: a network as a phrase for messages."""
    extra = {k: v for k, v in options.items() if k not in ("norm", "norm_options")}
    details = ", ".join(f"{k}={plain(v)!r}" for k, v in sorted(extra.items()))
    return f"{model} with norm {options.get('norm', _default_norm(model))!r}" + (f" ({details})" if details else "")


def _default_norm(model: Any) -> Any:
    try:
        return model_options(model).get("norm")
    except ValueError:
        return None


def option_differences(
    stored_model: Any, stored: Mapping[str, Any], model: Any, options: Mapping[str, Any]
) -> list[str]:
    """``"key: checkpoint X, asked for Y"`` for the architecture and for every option of ``options`` that
    ``stored`` also has and disagrees on (``norm_options`` excepted)."""
    differences = [f"model: checkpoint {stored_model!r}, asked for {model!r}"] if stored_model != model else []
    for key, value in sorted(options.items()):
        if key in stored and key not in NOT_IDENTITY and plain(stored[key]) != plain(value):
            differences.append(f"{key}: checkpoint {plain(stored[key])!r}, asked for {plain(value)!r}")
    return differences


def _resolved_network_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    return {**_own_defaults(hparams.get("model")), **network_options(hparams)}


def task_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The differences between a checkpoint's task hyperparameters and a wanted task's (a config's
    ``model.init_args``, or another checkpoint's), by the rules of the module doc."""
    differences = []
    stored_class, wanted_class = stored.get("_class_path"), wanted.get("_class_path")
    if stored_class and wanted_class and stored_class != wanted_class:
        differences.append(f"task class: checkpoint {stored_class!r}, asked for {wanted_class!r}")
    stored_options, wanted_options = _resolved_network_options(stored), _resolved_network_options(wanted)
    return differences + option_differences(stored.get("model"), stored_options, wanted.get("model"), wanted_options)


def data_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The differences between a checkpoint's data-module hyperparameters and a wanted data module's (both
    ``{"_class_path": ..., **init_args}``): its class and the :data:`DATA_IDENTITY` options both have."""
    differences = []
    stored_class, wanted_class = stored.get("_class_path"), wanted.get("_class_path")
    if stored_class and wanted_class and stored_class != wanted_class:
        differences.append(f"data: checkpoint {stored_class!r}, asked for {wanted_class!r}")
    for key in DATA_IDENTITY:
        if key in stored and key in wanted and plain(stored[key]) != plain(wanted[key]):
            differences.append(f"data {key}: checkpoint {plain(stored[key])!r}, asked for {plain(wanted[key])!r}")
    return differences


def check_fits(differences: list[str], holder: str, stored: str, wanted: str, hint: str = "") -> None:
    """Raise :class:`IncompatibleCheckpointError` (``"<holder> holds <stored>, not <wanted>: <differences>"``)
    when ``differences`` is not empty."""
    if differences:
        raise IncompatibleCheckpointError(
            f"{holder} holds {stored}, not {wanted}: {'; '.join(differences)}" + (f". {hint}" if hint else "")
        )
