"""TensorBoard logging that leaves normalization statistics alone."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from torch import Tensor

__all__ = ["TensorBoardLogger"]


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
