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
from torch.nn.utils.rnn import PackedSequence

from ..norms.renorm import _BatchRenorm
from ..norms.sequence import SequenceNorm, sequence_mask
from ..norms.sync import all_reduce_sum
from .checkpoints import LastCheckpoint

__all__ = ["MomentSums", "RecalibrateNormStats", "normalized_rows", "recalibrate_norm_stats", "stat_norm_layers"]

log = logging.getLogger(__name__)


def stat_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The norm layers of ``model`` that keep running statistics (bn, renorm, sequence norms, SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _sequence_mask(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The (B, T) mask of valid steps of a sequence norm's padded input (None: every step is valid)."""
    x = args[0]
    lengths = kwargs.get("lengths", args[1] if len(args) > 1 else None)
    return sequence_mask(x.shape[0], x.shape[1], lengths, kwargs.get("mask"), x.device)


def normalized_rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """What ``layer`` computes its batch statistics over: (N, C, *) input, or a sequence's valid (M, C) rows."""
    x = args[0]
    if isinstance(x, PackedSequence):
        return x.data
    if isinstance(layer, SequenceNorm):
        mask = _sequence_mask(layer, args, kwargs)
        return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
    return x


def _row_count(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | Tensor:
    """How many rows (samples x positions) :func:`normalized_rows` would give, without gathering them."""
    x = args[0]
    if isinstance(x, PackedSequence):
        return x.data.shape[0]
    if isinstance(layer, SequenceNorm):
        mask = _sequence_mask(layer, args, kwargs)
        return x.shape[0] * x.shape[1] if mask is None else mask.sum()
    return x.numel() // x.shape[1]


def _batch_moments(rows: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of (N, C, *) ``rows`` (native one pass), and the row count."""
    x = rows.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean, var, x.numel() // x.shape[1]


class MomentSums:
    """Per-channel sums over batches, in float64, for Alg. 2 and for the population estimate.

    Rows of ``sums`` (6, C): sum of batch means; sum of unbiased batch variances; number of batches; number of
    samples; sum of x; sum of x^2 (the last two from count-weighted batch moments). Sums, so that processes can
    add theirs.
    """

    ROWS = 6

    def __init__(self, layer: _BatchNorm) -> None:
        self.sums = torch.zeros(self.ROWS, layer.num_features, dtype=torch.float64, device=layer.running_mean.device)

    def add(self, rows: Tensor) -> None:
        """Add the batch of (N, C, *) ``rows``, measuring its moments."""
        self.add_moments(*_batch_moments(rows))

    def add_moments(self, mean: Tensor, biased_var: Tensor, count: int | Tensor) -> None:
        """Add batches given their per-channel means and biased variances: (C,) and a count for one batch, or
        (B, C) and B counts for B batches."""
        mean, var = mean.double().reshape(-1, mean.shape[-1]), biased_var.double().reshape(-1, mean.shape[-1])
        n = torch.as_tensor(count, dtype=torch.float64, device=self.sums.device).reshape(-1, 1)
        rows = (
            mean,
            var * (n / (n - 1).clamp_min(1.0)),
            torch.ones_like(mean),
            n.expand_as(mean),
            n * mean,
            n * (var + mean.square()),
        )
        self.sums += torch.stack(rows).sum(1)

    @staticmethod
    def estimate(sums: Tensor, population: bool) -> tuple[Tensor, Tensor]:
        """(mean, variance) from (possibly all-reduced) sums: Alg. 2, or the exact population moments."""
        if population:
            count = sums[3]
            mean = sums[4] / count
            biased = (sums[5] / count - mean.square()).clamp_min(0.0)
            return mean, biased * (count / (count - 1).clamp_min(1.0))
        return sums[0] / sums[2], sums[1] / sums[2]


class _LayerMoments:
    """One layer's batch moments, read from the layer's own training forward instead of a second pass.

    With ``momentum = 1`` a norm layer's update leaves the batch's moments in its running buffers (BatchNorm:
    the mean and the unbiased variance; Batch Renorm: the mean and ``sigma_B^2 - eps``, the biased variance).
    Before each call the layer gets copies of its trained buffers -- so a layer whose training output depends on
    them normalizes as in training -- and after it the copies, now holding the batch's moments, are
    kept and the trained buffers put back. On the first call the moments are also measured directly, which tells
    which variance the buffer holds; a layer whose buffers match neither (a custom update rule, a layer
    synchronized across processes) is measured on every call instead.
    """

    def __init__(self, layer: _BatchNorm) -> None:
        self.layer = layer
        self.reading: str | None = None  # "unbiased" | "biased" | "measured", decided on the first call
        self._trained = (layer.running_mean, layer.running_var)
        self._measured: tuple[Tensor, Tensor] | None = None
        self._means: list[Tensor] = []
        self._variances: list[Tensor] = []
        self._counts: list[int | Tensor] = []

    def before(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        layer.running_mean, layer.running_var = self._trained[0].clone(), self._trained[1].clone()
        if self.reading in (None, "measured"):
            mean, biased_var, count = _batch_moments(normalized_rows(layer, args, kwargs))
            self._measured = (mean, biased_var)
            self._counts.append(count)
        else:
            self._counts.append(_row_count(layer, args, kwargs))

    def after(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        mean, var = layer.running_mean, layer.running_var
        self.restore()
        if self.reading is None:
            self.reading = self._identify(mean, var)
        if self.reading == "measured":
            assert self._measured is not None
            mean, var = self._measured
        self._means.append(mean)
        self._variances.append(var)
        self._measured = None

    def restore(self) -> None:
        """Put the trained buffers (the same tensors) back."""
        self.layer.running_mean, self.layer.running_var = self._trained

    def sums(self) -> Tensor:
        """The :class:`MomentSums` rows of every call so far."""
        sums = MomentSums(self.layer)
        if self._means:
            mean, var = torch.stack(self._means).double(), torch.stack(self._variances).double()
            count = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=mean.device) for c in self._counts])
            if self.reading == "unbiased":
                var = var * ((count - 1).clamp_min(1.0) / count).unsqueeze(1)
            sums.add_moments(mean, var, count)
        return sums.sums

    def _identify(self, mean: Tensor, var: Tensor) -> str:
        assert self._measured is not None
        true_mean, biased = self._measured
        n = self._counts[-1]
        unbiased = biased * (n / max(n - 1, 1))
        scale = float(biased.abs().max()) + self.layer.eps
        if not torch.allclose(mean.float(), true_mean.float(), rtol=1e-4, atol=1e-4 * scale**0.5):
            return "measured"
        errors = {
            k: float((var.float() - v.float()).abs().max()) for k, v in (("unbiased", unbiased), ("biased", biased))
        }
        best = min(errors, key=errors.__getitem__)
        return best if errors[best] <= 1e-4 * scale else "measured"


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

    Batch Renorm layers run as BatchNorm (``r = 1, d = 0``) while statistics are collected, as Alg. 2 runs the
    training network of BN: each layer then normalizes with its batch's own statistics -- close to the
    recalibrated ones it will use at inference -- so the layers after it are measured on inputs like those they
    will see. With renorm's ``r`` and ``d`` they would be measured as normalized by the *old* running statistics,
    which recalibration replaces.
    """
    layers = stat_norm_layers(model)
    if not layers:
        rank_zero_info("RecalibrateNormStats: the model has no norm layer with running statistics; nothing to do.")
        return 0
    readers = [_LayerMoments(layer) for layer in layers]
    handles = []
    for reader in readers:
        handles.append(reader.layer.register_forward_pre_hook(reader.before, with_kwargs=True))
        handles.append(reader.layer.register_forward_hook(reader.after, with_kwargs=True))
    momenta = {layer: layer.momentum for layer in layers}
    bounds = {layer: (layer.r_max, layer.d_max) for layer in layers if isinstance(layer, _BatchRenorm)}
    used = 0
    try:
        with _norm_layers_in_training_mode(model, layers):
            for layer in layers:
                layer.momentum = 1.0  # the update then leaves the batch's moments in the buffers
            for layer in bounds:  # renorm as BatchNorm (r = 1, d = 0): see the docstring
                layer.r_max, layer.d_max = 1.0, 0.0
            for batch in batches:
                if used >= num_batches:
                    break
                forward(batch)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        for reader in readers:
            reader.restore()
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for layer, (r_max, d_max) in bounds.items():
            layer.r_max, layer.d_max = r_max, d_max
    if used < num_batches:
        warnings.warn(
            f"RecalibrateNormStats asked for {num_batches} batches but the data loader yielded only {used}",
            stacklevel=2,
        )
    if used == 0:
        return 0
    # one all-reduce for every layer's sums
    packed = all_reduce_sum(torch.cat([reader.sums() for reader in readers], dim=1), process_group)
    reduced = packed.split([layer.num_features for layer in layers], dim=1)
    for layer, sums in zip(layers, reduced, strict=True):
        mean, var = MomentSums.estimate(sums, population)
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

        used = recalibrate_norm_stats(
            pl_module, loader, lambda batch: run_model(pl_module, batch), self.num_batches, self.population
        )
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
