"""What bnzoo accepts from the hyperparameters stored in a checkpoint file.

A checkpoint's bytes load safely (:func:`bnzoo.io.safe_torch_load`), but its hyperparameters are data
that other code acts on: LightningCLI imports the module its ``_class_path`` names (before checking that it is a
task), ``load_from_checkpoint`` calls its ``_instantiator``, and a task's ``model_options.pretrained`` would make
the network download or read other weights. :func:`check_stored_hyperparameters` is the one check every bnzoo
path runs on them before anything acts on them:

* every class path (``class_path``, ``_class_path``, at any depth) names a module of bnzoo, Lightning or torch
  (:data:`ALLOWED_CLASS_PATH_ROOTS`), and ``_instantiator`` is Lightning's own; the refused name is in the message
  and nothing has been imported;
* ``model_options`` carries no ``pretrained``: a checkpoint's weights are its own ``state_dict``, never a pointer
  to another file or URL (a checkpoint naming itself would otherwise recurse until Python's recursion limit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ALLOWED_CLASS_PATH_ROOTS",
    "LIGHTNING_INSTANTIATOR",
    "UntrustedHyperparametersError",
    "check_checkpoint_hyperparameters",
    "check_class_path",
    "check_stored_hyperparameters",
]

#: the top-level packages a class path stored in a checkpoint may name
ALLOWED_CLASS_PATH_ROOTS = ("bnzoo", "lightning", "torch")

#: the only ``_instantiator`` a checkpoint may name (what LightningCLI stores)
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"

_CLASS_PATH_KEYS = ("class_path", "_class_path")

#: hyperparameter sections of a Lightning checkpoint (the task's and the data module's)
HYPERPARAMETER_SECTIONS = ("hyper_parameters", "datamodule_hyper_parameters")


class UntrustedHyperparametersError(ValueError):
    """A checkpoint's hyperparameters name a class outside the allow-list, or ask for other weights."""


def check_class_path(class_path: Any, where: str) -> None:
    """Raise :class:`UntrustedHyperparametersError` unless ``class_path`` is a dotted name under bnzoo, Lightning
    or torch. Pure string check: nothing is imported."""
    root = class_path.split(".", 1)[0] if isinstance(class_path, str) else None
    if root not in ALLOWED_CLASS_PATH_ROOTS or "." not in class_path:
        allowed = ", ".join(f"{name}.*" for name in ALLOWED_CLASS_PATH_ROOTS)
        raise UntrustedHyperparametersError(
            f"{where}: refused class path {class_path!r} (nothing was imported); a checkpoint may only name classes "
            f"of {allowed}"
        )


def _walk(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in _CLASS_PATH_KEYS:
                check_class_path(item, where)
            elif key == "_instantiator" and item != LIGHTNING_INSTANTIATOR:
                raise UntrustedHyperparametersError(
                    f"{where}: refused _instantiator {item!r} (nothing was imported); the only one accepted is "
                    f"{LIGHTNING_INSTANTIATOR!r}"
                )
            _walk(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, where)


def check_stored_hyperparameters(hparams: Any, where: str) -> None:
    """Refuse (:class:`UntrustedHyperparametersError`, naming ``where`` and the value) a task's stored
    hyperparameters that name a class outside :data:`ALLOWED_CLASS_PATH_ROOTS` anywhere, an ``_instantiator``
    other than Lightning's, or a ``model_options.pretrained``."""
    if not isinstance(hparams, Mapping):
        raise UntrustedHyperparametersError(f"{where}: hyperparameters are a {type(hparams).__name__}, not a mapping")
    _walk(hparams, where)
    options = hparams.get("model_options")
    if isinstance(options, Mapping) and "pretrained" in options:
        raise UntrustedHyperparametersError(
            f"{where}: refused model_options.pretrained={options['pretrained']!r}: a checkpoint's weights are its own "
            "state_dict; bnzoo never follows a checkpoint to other weights"
        )


def check_checkpoint_hyperparameters(checkpoint: Mapping[str, Any], where: str) -> None:
    """:func:`check_stored_hyperparameters` on every hyperparameter section of a loaded Lightning checkpoint."""
    for section in HYPERPARAMETER_SECTIONS:
        if section in checkpoint:
            check_stored_hyperparameters(checkpoint[section], f"{where} ({section})")
