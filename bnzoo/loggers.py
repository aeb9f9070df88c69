"""TensorBoard logging that leaves normalization statistics alone, and a learning-rate monitor for the CLI."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from torch import Tensor

__all__ = ["LearningRateMonitor", "TensorBoardLogger"]


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, with the model graph traced in eval mode.

    Tracing the graph runs one forward pass over ``example_input_array``; in training mode that pass would
    update every BatchNorm/Renorm layer's running statistics with a batch of zeros before training starts.
    """

    def log_graph(self, model: L.LightningModule, input_array: Tensor | tuple[Any, ...] | None = None) -> None:
        was_training = model.training
        model.eval()
        try:
            super().log_graph(model, input_array)
        finally:
            model.train(was_training)


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's LearningRateMonitor (every step), silent instead of failing when the run has no logger."""

    def __init__(self, logging_interval: str | None = "step", log_momentum: bool = False) -> None:
        super().__init__(logging_interval=logging_interval, log_momentum=log_momentum)

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
