"""The callback that recalibrates norm statistics after training (Ioffe & Szegedy 2015, Alg. 2): when it runs,
what it logs, which checkpoints it rewrites. The estimate itself, and its semantics under DDP, are
:func:`bnzoo.norms.recalibrate_norm_stats`'s."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..checks import check_positive_int
from ..norms.recalibration import RecalibrationResult, recalibrate_norm_stats
from .checkpoints import LastCheckpoint

__all__ = ["RecalibrateNormStats", "latest_checkpoint_paths", "run_model"]


class RecalibrateNormStats(Callback):
    """Recompute norm statistics after training (Ioffe & Szegedy 2015, Alg. 2), so checkpoints carry them.

    The recalibration runs after the last training step, *before* the final validation and checkpoint: the
    final validation metrics, the choice of the best checkpoint and ``last.ckpt`` (of :class:`LastCheckpoint`)
    all see the recalibrated statistics. (If training stops early -- early stopping, ``max_time`` -- it runs in
    ``on_train_end`` and the latest checkpoint is written again.) The validation accuracy and loss just before
    and after recalibrating are logged as ``recalibrate/val_acc_before``, ``recalibrate/val_acc_after`` (and
    ``..._loss_...``).

    Under DDP each process recalibrates from its own shard of the training batches and the estimates are
    combined as the module docstring says: without synchronized norms the result equals one process over the
    union of the processes' batches (each normalized by its own statistics); with :class:`bnzoo.plugins.NormSync`
    it equals one process on the concatenated (global) batches. Layers that get no rows (an auxiliary head that
    runs only in training mode, BN-LSTM steps beyond the batches' length) keep their statistics; a warning names
    them and :attr:`last_result` holds the :class:`RecalibrationResult` of the latest recalibration.

    Args:
        num_batches: training batches to estimate from.
        population: exact population mean/variance instead of Alg. 2's estimate.
        before_validation: also recalibrate before every validation during training.
        log_metrics: evaluate on the validation set just before and after the final recalibration (two extra
            passes, with the task's ``evaluate``) and log both.
    """

    def __init__(
        self,
        num_batches: int = 100,
        population: bool = False,
        before_validation: bool = False,
        log_metrics: bool = True,
    ) -> None:
        self.num_batches = check_positive_int("num_batches", num_batches)
        self.population = population
        self.before_validation = before_validation
        self.log_metrics = log_metrics
        self.last_result: RecalibrationResult | None = None
        self._done_at_step: int | None = None

    # -- when ---------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if _is_last_training_batch(trainer):
            self._final_recalibration(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_validation and trainer.state.fn == "fit" and not trainer.sanity_checking:
            if self._done_at_step != trainer.global_step:
                self.recalibrate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._done_at_step == trainer.global_step:
            return
        self._final_recalibration(trainer, pl_module)
        for path in latest_checkpoint_paths(trainer):
            trainer.save_checkpoint(path)
            rank_zero_info(f"RecalibrateNormStats: rewrote {path} with the recalibrated statistics")

    # -- what ---------------------------------------------------------------------------------------------
    def _final_recalibration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluate = getattr(pl_module, "evaluate", None) if self.log_metrics else None
        loaders = trainer.val_dataloaders
        if evaluate is None or loaders is None or (isinstance(loaders, (list, tuple)) and not loaders):
            # no validation split (``val_size=0``): recalibrate, nothing to compare
            self.recalibrate(trainer, pl_module)
            return
        limits = trainer.num_val_batches or None
        before = evaluate(loaders, limits)
        self.recalibrate(trainer, pl_module)
        after = evaluate(loaders, limits)
        metrics = {f"recalibrate/val_{k}_before": v for k, v in before.items()}
        metrics |= {f"recalibrate/val_{k}_after": v for k, v in after.items()}
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        summary = ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before)
        rank_zero_info(f"RecalibrateNormStats: validation {summary}")

    def recalibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> RecalibrationResult:
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader

        self.last_result = recalibrate_norm_stats(
            pl_module, loader, lambda batch: run_model(pl_module, batch), self.num_batches, self.population
        )
        self._done_at_step = trainer.global_step
        return self.last_result


def latest_checkpoint_paths(trainer: L.Trainer) -> list[str]:
    """The files that hold the run's latest state: ``LastCheckpoint``'s and any ``save_last`` file."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint) and callback.best_model_path:
            paths.append(callback.best_model_path)
        elif getattr(callback, "save_last", False) and getattr(callback, "last_model_path", ""):
            paths.append(callback.last_model_path)
    return sorted(set(paths))


def run_model(pl_module: L.LightningModule, batch: Any) -> Any:
    """Forward one batch on the module's device: the task's ``split_batch`` when it has one, else the first
    element of the batch."""
    if isinstance(pl_module, L.LightningModule):
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
    if hasattr(pl_module, "split_batch"):
        inputs, _ = pl_module.split_batch(batch)
        return pl_module(*inputs)
    return pl_module(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _is_last_training_batch(trainer: L.Trainer) -> bool:
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    return bool(trainer.is_last_batch) and trainer.current_epoch >= max_epochs - 1
