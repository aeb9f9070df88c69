"""The Lightning tasks: :class:`ImageClassifier` and :class:`SequenceClassifier` (one loss, metrics, the
optimizer and schedule, in :mod:`.classification`), and :func:`load_pretrained` (:mod:`.pretrained`)."""

from .classification import (
    ClassificationTask,
    ImageClassifier,
    SequenceClassifier,
    check_model_config,
    check_task_hparams,
)
from .pretrained import load_pretrained

# Checkpoints and configs name the tasks by their public path (``bnzoo.tasks.ImageClassifier``), as torch names
# its public classes by ``torch.nn``: the path stays valid whatever module of the package defines them.
for _task in (ClassificationTask, ImageClassifier, SequenceClassifier):
    _task.__module__ = __name__

__all__ = [
    "ClassificationTask",
    "ImageClassifier",
    "SequenceClassifier",
    "check_model_config",
    "check_task_hparams",
    "load_pretrained",
]
