"""The numbers an experiment keeps from a training run, recorded in memory by a callback."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["MetricsRecorder"]


class MetricsRecorder(Callback):
    """Records the validation curve, the training loss and divergence of a run; stops a diverged run.

    * ``val``: ``[step, val/acc, val/loss]`` after every validation (not the sanity check);
    * ``train_loss``: ``[step, loss]`` every ``train_loss_every`` optimizer steps;
    * ``diverged_at``: the first step whose training loss is not finite (None if none). With
      ``stop_on_divergence`` the run stops there: nothing more is to be learned from NaN weights.
    * ``wall_s``: seconds from the start to the end of training.
    """

    def __init__(self, train_loss_every: int = 10, stop_on_divergence: bool = True) -> None:
        if isinstance(train_loss_every, bool) or not isinstance(train_loss_every, int) or train_loss_every < 1:
            raise ValueError(f"train_loss_every must be a positive int, got {train_loss_every!r}")
        self.train_loss_every = train_loss_every
        self.stop_on_divergence = stop_on_divergence
        self.val: list[list[float]] = []
        self.train_loss: list[list[float]] = []
        self.diverged_at: int | None = None
        self.wall_s = 0.0
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return
        value = float(loss.detach())
        step = trainer.global_step - 1  # the step that produced this loss
        if not math.isfinite(value) and self.diverged_at is None:
            self.diverged_at = step
            if self.stop_on_divergence:
                trainer.should_stop = True
        if step % self.train_loss_every == 0 or not math.isfinite(value):
            self.train_loss.append([step, value])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        acc, loss = metrics.get("val/acc"), metrics.get("val/loss")
        if acc is not None:
            self.val.append([trainer.global_step, float(acc), float(loss) if loss is not None else math.nan])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.wall_s = time.perf_counter() - self._start

    def as_dict(self) -> dict[str, Any]:
        return {
            "val": self.val,
            "train_loss": self.train_loss,
            "diverged_at": self.diverged_at,
            "train_wall_s": self.wall_s,
        }
