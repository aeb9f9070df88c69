"""Recompute the running statistics of every norm layer from training data ("precise BN").

Ioffe & Szegedy 2015, Algorithm 2 (steps 8-11): after training, the inference statistics are
``E[x] = E_B[mu_B]`` and ``Var[x] = m/(m-1) * E_B[sigma_B^2]`` over mini-batches B of size m -- not the
exponential moving averages kept during training, which lag behind the weights that produced them. With
``population=True`` the exact mean and (unbiased) variance over every sample seen are used instead, as
fvcore's precise BN does.

Under DDP every process runs its own batches and the per-channel *sums* (of batch means, of unbiased batch
variances, of counts, ...) are all-reduced, so the result is the one a single process gets over the union of
all processes' batches.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..norms.sequence import SequenceNorm, sequence_mask
from ..norms.sync import all_reduce_sum
from .checkpoints import LastCheckpoint

__all__ = ["RecalibrateNormStats", "recalibrate_norm_stats", "stat_norm_layers"]

log = logging.getLogger(__name__)


def stat_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The norm layers of ``model`` that keep running statistics (bn, renorm, sequence norms, SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _normalized_rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """What ``layer`` computes its batch statistics over: (N, C, *) input, or a sequence's valid (M, C) rows."""
    x = args[0]
    if isinstance(layer, SequenceNorm):
        lengths = kwargs.get("lengths", args[1] if len(args) > 1 else None)
        mask = sequence_mask(x.shape[0], x.shape[1], lengths, kwargs.get("mask"), x.device)
        return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
    return x


class _MomentAccumulator:
    """Per-channel sums over batches, in float64, for Alg. 2 and for the population estimate.

    Rows of ``sums`` (6, C): sum of batch means; sum of unbiased batch variances; number of batches; number of
    samples; sum of x; sum of x^2 (the last two from count-weighted batch moments). Sums, so that processes can
    add theirs.
    """

    ROWS = 6

    def __init__(self, layer: _BatchNorm) -> None:
        self.sums = torch.zeros(self.ROWS, layer.num_features, dtype=torch.float64, device=layer.running_mean.device)

    def add(self, rows: Tensor) -> None:
        x = rows.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # native one-pass, biased variance
        n = x.numel() // x.shape[1]
        mean, var = mean.double(), var.double()
        self.sums[0] += mean
        self.sums[1] += var * (n / max(n - 1, 1))
        self.sums[2] += 1.0
        self.sums[3] += n
        self.sums[4] += n * mean
        self.sums[5] += n * (var + mean.square())

    @staticmethod
    def estimate(sums: Tensor, population: bool) -> tuple[Tensor, Tensor]:
        """(mean, variance) from (possibly all-reduced) sums: Alg. 2, or the exact population moments."""
        if population:
            count = sums[3]
            mean = sums[4] / count
            biased = (sums[5] / count - mean.square()).clamp_min(0.0)
            return mean, biased * (count / (count - 1).clamp_min(1.0))
        return sums[0] / sums[2], sums[1] / sums[2]


@contextmanager
def _norm_layers_in_training_mode(model: nn.Module, layers: list[_BatchNorm]):
    """Everything in eval mode (dropout off) except the norm layers; modes and counters restored after."""
    modes = {m: m.training for m in model.modules()}
    counters = {m: m.num_batches_tracked.clone() for m in layers if m.num_batches_tracked is not None}
    model.eval()
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)
        with torch.no_grad():
            for layer, count in counters.items():
                layer.num_batches_tracked.copy_(count)


@torch.no_grad()
def recalibrate_norm_stats(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], Any],
    num_batches: int = 100,
    population: bool = False,
    process_group: Any = None,
) -> int:
    """Recompute the running statistics of ``model``'s norm layers from ``batches``; returns batches used.

    Args:
        model: the network (its norm layers are found by type; parameters are never touched).
        batches: an iterable of batches (a training data loader, already sharded under DDP).
        forward: runs the model on one batch (moving it to the device first if needed).
        num_batches: how many batches to use; fewer available gives a warning with the count.
        population: exact mean/variance over all samples instead of Alg. 2's mean of batch moments.
        process_group: all-reduce the sums over this group (None: the world, when distributed).
    """
    layers = stat_norm_layers(model)
    if not layers:
        rank_zero_info("RecalibrateNormStats: the model has no norm layer with running statistics; nothing to do.")
        return 0
    accumulators = {layer: _MomentAccumulator(layer) for layer in layers}

    def hook(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        accumulators[layer].add(_normalized_rows(layer, args, kwargs))  # type: ignore[index]

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    used = 0
    try:
        with _norm_layers_in_training_mode(model, layers):
            for batch in batches:
                if used >= num_batches:
                    break
                forward(batch)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
    if used < num_batches:
        warnings.warn(
            f"RecalibrateNormStats asked for {num_batches} batches but the data loader yielded only {used}",
            stacklevel=2,
        )
    if used == 0:
        return 0
    # one all-reduce for every layer's sums
    packed = all_reduce_sum(torch.cat([accumulators[layer].sums for layer in layers], dim=1), process_group)
    reduced = packed.split([layer.num_features for layer in layers], dim=1)
    for layer, sums in zip(layers, reduced, strict=True):
        mean, var = _MomentAccumulator.estimate(sums, population)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
    return used


class RecalibrateNormStats(Callback):
    """Recompute norm statistics after training (Ioffe & Szegedy 2015, Alg. 2), so checkpoints carry them.

    The recalibration runs after the last training step, *before* the final validation and checkpoint: the
    final validation metrics, the choice of the best checkpoint and ``last.ckpt`` (of :class:`LastCheckpoint`)
    all see the recalibrated statistics. (If training stops early -- early stopping, ``max_time`` -- it runs in
    ``on_train_end`` and the latest checkpoint is written again.) The validation accuracy and loss just before
    and after recalibrating are logged as ``recalibrate/val_acc_before``, ``recalibrate/val_acc_after`` (and
    ``..._loss_...``).

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
        if num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
        self.num_batches = num_batches
        self.population = population
        self.before_validation = before_validation
        self.log_metrics = log_metrics
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
        if evaluate is None or loaders is None:
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

    def recalibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader

        def forward(batch: Any) -> Any:
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            return run_model(pl_module, batch)

        used = recalibrate_norm_stats(pl_module, loader, forward, self.num_batches, self.population)
        self._done_at_step = trainer.global_step
        return used


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
    """Forward one batch: the task's ``split_batch`` when it has one, else the first element of the batch."""
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
