"""Ghost batches (a *virtual batch size*): batch statistics over groups of k consecutive samples of a batch.

Hoffer et al. 2017 ("Train longer, generalize better", Sec. 4, Alg. 1, Ghost Batch Normalization) and Ioffe
2017 (Sec. 4.3, micro-batches: groups of 4 inside a gradient batch of 32) normalize each group of ``k`` samples
with that group's own moments. With ``virtual_batch_size=k`` a batch of N = G k samples is split into the G
groups ``[0, k), [k, 2k), ...`` and, per channel and group g (Ioffe & Szegedy 2015, Alg. 1 over the group)::

    y = gamma * (x - mu_g) / sqrt(var_g + eps) + beta                      (bn)
    y = gamma * ((x - mu_g) / sigma_g * r_g + d_g) + beta                  (renorm, Ioffe 2017, Alg. 1)
    r_g = clip(sigma_g / sigma, 1/r_max, r_max),  d_g = clip((mu_g - mu) / sigma, -d_max, d_max)

r_g and d_g are taken per group against the layer's one set of running statistics. The running statistics
are updated once per batch from the *mean over the groups* (as tf-keras does: "update in one step" with the
groups' averaged moments), which equals the average of the G updates each group would make on its own from
the same running statistics::

    bn:      mu <- (1 - a) mu + a mean_g(mu_g)        var <- (1 - a) var + a mean_g(m/(m-1) var_g)
    renorm:  mu <- mu + a (mean_g(mu_g) - mu)         sigma <- sigma + a (mean_g(sigma_g) - sigma)

(m = k times the spatial size: torch's unbiased variance, per group). Inference is unchanged: the running
statistics, as without ghost batches.

Grouping. tf-keras reshapes the batch to ``[k, N/k, ...]`` and reduces over the first axis, so its group j holds
the *strided* samples j, j + N/k, j + 2N/k, ...; bnzoo groups *consecutive* samples (as ``x.chunk(G)`` and
Hoffer et al.'s code do). For a shuffled batch the two are the same in distribution; consecutive groups also
stay the same groups when a batch is split across processes: under :class:`bnzoo.plugins.NormSync` the groups
are per process (each process's batch must be a multiple of k, and groups never straddle processes), the
moments are local to the group, and the running statistics are averaged over the groups of *all* processes,
so every process keeps the same running statistics, equal to one process on the concatenated batch.

Implementation: the (N, C, *) input is rearranged to (k, G C, *) (sample j of group g to row j, channel
g C + c; one copy, in the input's memory format), so that the native BatchNorm kernels treat each (group,
channel) pair as one channel, with gamma and beta repeated over the groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _SyncableBatchNorm, check_channels, update_rate
from .opaque import batch_moments, call_opaque
from .renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    _BatchRenorm,
    _BatchRenormFunction,
    _check_bounds,
    batch_renorm_corrections,
)
from .sync import all_reduce_sum

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostBatchRenorm1d",
    "GhostBatchRenorm2d",
    "GhostBatchRenorm3d",
    "check_virtual_batch_size",
    "from_ghost_groups",
    "ghost_group_count",
    "mean_over_groups",
    "to_ghost_groups",
]


def check_virtual_batch_size(value: Any) -> int | None:
    """``value`` if it is None or a positive int, else a ValueError naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"virtual_batch_size must be a positive int (or None for the whole batch), got {value!r}")
    return value


def ghost_group_count(input: Tensor, virtual_batch_size: int) -> int:
    """The number G of ghost batches in ``input`` (N, C, *); a ValueError naming both numbers unless k divides N,
    or when a group would hold a single value per channel (no variance)."""
    batch = input.shape[0]
    if batch % virtual_batch_size:
        raise ValueError(
            f"the batch size {batch} is not divisible by virtual_batch_size {virtual_batch_size}: ghost batches "
            f"split a batch into groups of exactly {virtual_batch_size} samples"
        )
    values = virtual_batch_size * (input[0, 0].numel() if input.dim() > 2 else 1)
    if values < 2:
        raise ValueError(
            f"virtual_batch_size {virtual_batch_size} leaves 1 value per channel in each group of an input of "
            f"shape {tuple(input.shape)}: batch statistics need at least 2"
        )
    return batch // virtual_batch_size


def _channels_last(x: Tensor) -> bool:
    return x.dim() > 3 and not x.is_contiguous() and x.is_contiguous(memory_format=_last_format(x))


def _last_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def to_ghost_groups(x: Tensor, groups: int) -> Tensor:
    """(N, C, *) -> (k, G C, *) with ``out[j, g C + c] = x[g k + j, c]``; channels-last inputs stay channels-last."""
    batch, channels, *spatial = x.shape
    k = batch // groups
    if _channels_last(x):
        last = x.movedim(1, -1)  # (N, *S, C), contiguous
        grouped = last.reshape(groups, k, *spatial, channels).movedim(0, -2).contiguous()  # (k, *S, G, C)
        return grouped.view(k, *spatial, groups * channels).movedim(-1, 1)
    return x.reshape(groups, k, channels, *spatial).transpose(0, 1).reshape(k, groups * channels, *spatial)


def from_ghost_groups(y: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`to_ghost_groups`: (k, G C, *) -> (N, C, *), in ``y``'s memory format."""
    k, grouped_channels, *spatial = y.shape
    channels = grouped_channels // groups
    if _channels_last(y):
        last = y.movedim(1, -1).reshape(k, *spatial, groups, channels)  # (k, *S, G, C)
        return last.movedim(-2, 0).reshape(k * groups, *spatial, channels).movedim(-1, 1)
    return y.reshape(k, groups, channels, *spatial).transpose(0, 1).reshape(k * groups, channels, *spatial)


def mean_over_groups(stats: Tensor, groups: int, synchronized: bool, group: Any = None) -> Tensor:
    """(S, G C) per-group statistics -> (S, C): their mean over the G groups, and over the groups of every
    process when ``synchronized`` (one all-reduce of the sums and the group count)."""
    rows, grouped = stats.shape
    sums = stats.view(rows, groups, grouped // groups).sum(1)
    if not synchronized:
        return sums / groups
    count = torch.full((rows, 1), float(groups), dtype=sums.dtype, device=sums.device)
    reduced = all_reduce_sum(torch.cat((sums, count), dim=1), group)
    return reduced[:, :-1] / reduced[:, -1:]


# ----------------------------------------------------------------------------------------------------------
# The layers: BatchNorm and Batch Renorm with ghost batches


class GhostBatchMixin:
    """Training-mode batch statistics over ghost batches of ``virtual_batch_size`` consecutive samples; mixed
    into a BatchNorm or Batch Renorm class (see the module docstring). Eval mode is the base class's."""

    virtual_batch_size: int

    def _init_ghost(self, virtual_batch_size: Any) -> None:
        checked = check_virtual_batch_size(virtual_batch_size)
        if checked is None:
            raise ValueError("a ghost-batch layer needs a virtual_batch_size (a positive int), got None")
        self.virtual_batch_size = checked

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"  # type: ignore[misc]


class _GhostBatchNorm(GhostBatchMixin, _SyncableBatchNorm):
    """BatchNorm (Ioffe & Szegedy 2015, Alg. 1) over ghost batches; running statistics from the groups' mean."""

    def __init__(self, num_features: int, *, virtual_batch_size: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self._init_ghost(virtual_batch_size)

    def forward(self, input: Tensor) -> Tensor:
        check_channels(self, input)
        self._check_input_dim(input)
        track = self.track_running_stats and self.running_mean is not None
        if not self.training and track:
            return super().forward(input)  # inference: BatchNorm on the running statistics, unchanged
        groups = ghost_group_count(input, self.virtual_batch_size)
        grouped = to_ghost_groups(input, groups)
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        if not (self.training and track):
            return from_ghost_groups(F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps), groups)
        # momentum 1 on zeroed buffers: the kernel writes each group's mean and unbiased variance into them
        group_mean = torch.zeros(grouped.shape[1], dtype=self.running_mean.dtype, device=input.device)
        group_var = torch.zeros_like(group_mean)
        out = F.batch_norm(grouped, group_mean, group_var, weight, bias, True, 1.0, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            rate = update_rate(self.momentum, self.num_batches_tracked)
            stats = torch.stack((group_mean, group_var))
            means = mean_over_groups(stats, groups, self._sync_active(), self.process_group)
            torch._foreach_lerp_([self.running_mean, self.running_var], [means[0], means[1]], rate)
        return from_ghost_groups(out, groups)


def _ghost_renorm_corrections(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float,
    d_max: float,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ioffe 2017, Alg. 1 per ghost batch: ``(r, d, 1 / sigma_g, sigma_g)`` for the (G C,) group moments against
    the (C,) running statistics, which it only reads. Under ``torch.compile`` it is the opaque operator
    ``torch.ops.bnzoo.ghost_renorm_corrections``, so the backward graph never recomputes r or d from running
    statistics updated in the meantime (see :mod:`bnzoo.norms.opaque`)."""
    batch_std = (batch_var + eps).sqrt()
    running_std = (running_var + eps).sqrt()
    channels = running_mean.shape[0]
    r, d = batch_renorm_corrections(
        batch_mean.view(groups, channels), batch_std.view(groups, channels), running_mean, running_std, r_max, d_max
    )
    # r and d are views of one tensor: copies, since an operator's outputs may not alias each other
    return r.reshape(-1).clone(), d.reshape(-1).clone(), batch_std.reciprocal(), batch_std


_ghost_renorm_corrections_op = torch.library.custom_op(
    "bnzoo::ghost_renorm_corrections", _ghost_renorm_corrections, mutates_args=()
)


@_ghost_renorm_corrections_op.register_fake
def _ghost_renorm_corrections_fake(batch_mean: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(batch_mean) for _ in range(4))  # type: ignore[return-value]


class _GhostBatchRenorm(GhostBatchMixin, _BatchRenorm):
    """Batch Renorm (Ioffe 2017, Alg. 1) over ghost batches: r and d per group against the shared running
    statistics, which are updated from the groups' mean moments (module docstring)."""

    def __init__(self, num_features: int, *, virtual_batch_size: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self._init_ghost(virtual_batch_size)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        check_channels(self, input)
        _check_bounds(self.r_max, self.d_max)
        groups = ghost_group_count(input, self.virtual_batch_size)
        grouped = to_ghost_groups(input, groups)
        with torch.no_grad():
            # float32 buffers with momentum 0: float32 moments for bf16/fp16 inputs, nothing written
            like = torch.zeros(grouped.shape[1], dtype=self.running_mean.dtype, device=input.device)
            mean, var = batch_moments(grouped, like, like.clone())
        r, d, invstd, batch_std = call_opaque(
            _ghost_renorm_corrections_op,
            _ghost_renorm_corrections,
            mean,
            var,
            self.running_mean,
            self.running_var,
            self.eps,
            self.r_max,
            self.d_max,
            groups,
        )
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            rate = update_rate(self.momentum, self.num_batches_tracked)
            stats = torch.stack((mean, batch_std))
            means = mean_over_groups(stats, groups, self._sync_active(), self.process_group)
            running_std = (self.running_var + self.eps).sqrt_()
            torch._foreach_lerp_([self.running_mean, running_std], [means[0], means[1]], rate)
            torch.mul(running_std, running_std, out=self.running_var).sub_(self.eps)
        if self.record_corrections:
            self.last_r, self.last_d = r.view(groups, -1), d.view(groups, -1)
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        out = _BatchRenormFunction.apply(grouped, weight, bias, r, d, mean, var, invstd, self.eps)
        return from_ghost_groups(out, groups)


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """BatchNorm1d with ghost batches, for (N, C) or (N, C, L) inputs."""


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """BatchNorm2d with ghost batches, for (N, C, H, W) inputs."""


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    """BatchNorm3d with ghost batches, for (N, C, D, H, W) inputs."""


class GhostBatchRenorm1d(_GhostBatchRenorm, BatchRenorm1d):
    """Batch Renorm with ghost batches, for (N, C) or (N, C, L) inputs."""


class GhostBatchRenorm2d(_GhostBatchRenorm, BatchRenorm2d):
    """Batch Renorm with ghost batches, for (N, C, H, W) inputs."""


class GhostBatchRenorm3d(_GhostBatchRenorm, BatchRenorm3d):
    """Batch Renorm with ghost batches, for (N, C, D, H, W) inputs."""
