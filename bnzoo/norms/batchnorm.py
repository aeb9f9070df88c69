"""Batch Normalization (Ioffe & Szegedy 2015) as torch's ``nn.BatchNorm*d``, plus cross-process sync.

The ``bn`` kind of :func:`bnzoo.norms.make_norm`. In one process these layers *are* torch's BatchNorm (same
kernel, same state dict, same results): the only addition is that :class:`bnzoo.plugins.NormSync` can switch
them to global batch moments across processes, which torch's ``nn.SyncBatchNorm`` refuses to do on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .sync import SyncableNorm, global_batch_moments, normalize_with_moments

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "check_channels", "check_norm_args", "update_rate"]


def check_norm_args(num_features: Any, eps: Any, momentum: Any) -> None:
    """Fail at construction, naming the bad value, for arguments torch itself would accept silently."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0
    ):
        raise ValueError(f"momentum must be in (0, 1] (or None for a cumulative average), got {momentum!r}")


def check_channels(layer: nn.Module, input: Tensor) -> None:
    """Raise a ValueError naming the shape unless ``input`` is (N, layer.num_features, *).

    Every channel norm checks this before its kernel: a native kernel given too many channels may read and
    write past per-channel buffers instead of failing.
    """
    channels = layer.num_features
    if input.dim() < 2 or input.shape[1] != channels:
        raise ValueError(
            f"{type(layer).__name__}({channels}) expects an input of shape (N, {channels}, *), got {tuple(input.shape)}"
        )


def update_rate(momentum: float | None, num_batches_tracked: Tensor) -> float:
    """The running-statistics update rate of this step, as torch's BatchNorm defines it.

    ``momentum`` itself, or ``1 / num_batches_tracked`` (a cumulative average) when momentum is None. Call
    after incrementing ``num_batches_tracked``.
    """
    if momentum is None:
        return 1.0 / float(num_batches_tracked)
    return float(momentum)


class _SyncableBatchNorm(SyncableNorm, _BatchNorm):
    """torch BatchNorm whose training-mode statistics can be global across processes."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_norm_args(num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        check_channels(self, input)  # before torch's BatchNorm counts the batch in num_batches_tracked
        if not self._sync_active():
            return super().forward(input)
        self._check_input_dim(input)
        track = self.track_running_stats and self.running_mean is not None
        mean, var, count = global_batch_moments(input, self.running_mean if track else None, self.process_group)
        if track:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                rate = update_rate(self.momentum, self.num_batches_tracked)
                unbiased_var = var.detach() * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), rate)
                self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), rate)
        return normalize_with_moments(input, mean, var, self.weight, self.bias, self.eps)


class BatchNorm1d(_SyncableBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` for (N, C) or (N, C, L) inputs, synchronizable across processes."""


class BatchNorm2d(_SyncableBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` for (N, C, H, W) inputs, synchronizable across processes."""


class BatchNorm3d(_SyncableBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` for (N, C, D, H, W) inputs, synchronizable across processes."""
