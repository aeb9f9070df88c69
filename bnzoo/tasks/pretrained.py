"""The LightningModule of a zoo checkpoint: ``bnzoo.load_pretrained(name | path | URL)``, verified and loaded
by :mod:`bnzoo.zoo`; the task class is the one the checkpoint records, chosen among bnzoo's own tasks (never
imported from a name in the file)."""

from __future__ import annotations

import os
from typing import Any

from ..zoo.checkpoint import TASK_CLASS_KEY, load_checkpoint, load_network_state
from .classification import ClassificationTask, ImageClassifier, SequenceClassifier

__all__ = ["TASK_CLASSES", "load_pretrained"]

#: the task classes a checkpoint may name, by the class path LightningCLI and the tasks record
TASK_CLASSES: dict[str, type[ClassificationTask]] = {
    f"bnzoo.tasks.{cls.__name__}": cls for cls in (ImageClassifier, SequenceClassifier)
}


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
    classes = TASK_CLASSES
    class_path = hparams.get("_class_path")
    if class_path is None:
        raise ValueError(
            f"{checkpoint.path}: the checkpoint records no task class (neither LightningCLI's "
            f"_class_path nor a bnzoo task's {TASK_CLASS_KEY!r}); valid task classes: {', '.join(classes)}"
        )
    if class_path not in classes:
        raise ValueError(f"{checkpoint.path}: unknown task class {class_path!r}; valid: {', '.join(classes)}")
    arguments = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        task = classes[class_path](**arguments)
    except TypeError as err:
        raise ValueError(f"{checkpoint.path}: its hyperparameters do not fit {class_path}: {err}") from err
    load_network_state(task.model, checkpoint, f"{class_path}({checkpoint.describe()})")
    return task
