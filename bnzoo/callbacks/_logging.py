"""What the diagnostics callbacks share: how often they log, the names they log under, and writing scalars and
histograms to the trainer's loggers (histograms only to TensorBoard loggers)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from ..registry import closest

#: bins of every histogram: TensorBoard's default ("tensorflow", ~1500 exponential bins) costs ~2 ms per histogram
#: on a CPU, 64 equal bins ~0.3 ms
HISTOGRAM_BINS = 64

__all__ = ["HISTOGRAM_BINS", "log_histograms", "log_scalars", "logging_step", "named_submodules", "short_name"]


def short_name(name: str) -> str:
    """A module's name as a user reads it: without the task's ``model.`` prefix."""
    return name.removeprefix("model.")


def logging_step(trainer: L.Trainer, every_n_steps: int) -> int | None:
    """The optimizer step about to run, if it is one to log (called at the start of a training batch: the step
    counter advances after the optimizer step, before ``on_train_batch_end``); else None."""
    step = trainer.global_step
    return step if not trainer.sanity_checking and step % every_n_steps == 0 else None


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def log_histograms(trainer: L.Trainer, values: dict[str, Tensor], step: int) -> None:
    """Histograms to every TensorBoard logger of the trainer (other loggers have no histograms)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, tensor in values.items():
                logger.experiment.add_histogram(tag, tensor.detach().float().cpu(), step, bins=HISTOGRAM_BINS)


def named_submodules(root: nn.Module, names: Sequence[str], what: str) -> dict[str, nn.Module]:
    """``{name: module}`` for each of ``names``; an unknown name fails with the closest valid ones."""
    available = dict(root.named_modules())
    for name in names:
        if name not in available:
            raise ValueError(f"{what}: the model has no module {name!r}{closest(name, available, n=5)}")
    return {name: available[name] for name in names}
