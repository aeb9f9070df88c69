"""Cross-process reductions shared by every synchronized norm and by statistics recalibration.

One code path serves every synchronized kind (``bn``, ``renorm``, the sequence norms) and
:class:`~bnzoo.callbacks.RecalibrateNormStats`: each process reduces its local *sums* (count, shifted sum and
shifted sum of squares per channel) and :func:`all_reduce_sum` adds them across processes, so the global
moments equal those of one process that saw the concatenated batch -- not an average of per-process moments.

The reduction is differentiable: :class:`_AllReduceSum` all-reduces in the forward pass and all-reduces the
incoming gradient in the backward pass, which is the gradient of the sum over processes (what
``nn.SyncBatchNorm`` computes with its fused CUDA kernels, here in plain tensor ops that also run on the CPU
with gloo).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .opaque import snapshot

__all__ = [
    "SyncableNorm",
    "all_reduce_sum",
    "global_batch_moments",
    "is_distributed",
    "normalize_with_moments",
]


def is_distributed(group: Any = None) -> bool:
    """True when a default process group is initialized and ``group`` spans more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over processes; the backward pass sums the gradients over processes in the same way.

    With ``L = sum_p L_p`` and every process using the reduced tensor ``S = sum_p s_p``, the gradient of ``L``
    with respect to one process's ``s_p`` is ``sum_q dL_q/dS``: the all-reduced incoming gradient.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        reduced = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # the sum's derivative is the sum: through all_reduce_sum, the backward is differentiable in turn
        # (double backward: gradient penalties)
        return all_reduce_sum(grad, ctx.group), None


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over the processes of ``group`` (the world when None); differentiable.

    Returns ``tensor`` itself when there is only one process, so single-process code pays nothing.
    """
    if not is_distributed(group):
        return tensor
    if torch.is_grad_enabled() and tensor.requires_grad:
        return _AllReduceSum.apply(tensor, group)
    reduced = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """View a per-channel vector (C,) so that it broadcasts against an (N, C, *) tensor of ``ndim`` dims."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def global_batch_moments(x: Tensor, shift: Tensor | None = None, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, *biased* variance and count of ``x`` (N, C, *) over all processes of ``group``.

    Each process contributes its count ``n_p``, ``sum(x - K)`` and ``sum((x - K)^2)``, where the shift ``K`` is
    a per-channel constant equal on every process (the layer's running mean): shifting by a value near the
    mean keeps ``E[(x-K)^2] - E[x-K]^2`` accurate in float32. The three are reduced in *one* all-reduce.
    Then ``mean = K + S1/n`` and ``var = S2/n - (S1/n)^2`` (Ioffe & Szegedy 2015, Alg. 1, over the union of
    the processes' mini-batches). Statistics are computed in float32 for reduced-precision inputs.
    Differentiable with respect to ``x``. The shift is read through :func:`~bnzoo.norms.opaque.snapshot`: a
    compiled backward pass would otherwise recompute ``x - K`` from a running mean updated in the meantime.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got shape {tuple(x.shape)}")
    num_channels = x.shape[1]
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dims = [0, *range(2, x.dim())]
    shift = torch.zeros(num_channels, dtype=xf.dtype, device=x.device) if shift is None else snapshot(shift)
    centered = xf - _channel_view(shift.to(xf.dtype), x.dim())
    local_count = torch.full((1,), x.numel() // max(num_channels, 1), dtype=xf.dtype, device=x.device)
    packed = torch.cat([centered.sum(dims), centered.square().sum(dims), local_count])
    packed = all_reduce_sum(packed, group)
    count = packed[-1]
    mean_shifted = packed[:num_channels] / count
    var = (packed[num_channels:-1] / count - mean_shifted.square()).clamp_min(0.0)
    return shift.to(xf.dtype) + mean_shifted, var, count


def normalize_with_moments(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r: Tensor | None = None,
    d: Tensor | None = None,
) -> Tensor:
    """``y = gamma * ((x - mean) / sqrt(var + eps) * r + d) + beta`` for (N, C, *) inputs, in plain tensor ops.

    This is Ioffe 2017, Alg. 1 (Batch Renormalization); with ``r = 1, d = 0`` it is Ioffe & Szegedy 2015,
    Alg. 1 (Batch Normalization). ``mean`` and ``var`` may carry gradients (synchronized moments); ``r`` and
    ``d`` are treated as constants. Computed as ``x * scale + shift`` with per-channel ``scale`` and ``shift``.
    """
    scale = torch.rsqrt(var + eps)
    if r is not None:
        scale = scale * r
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if d is not None:
        shift = shift + (d if weight is None else weight * d)
    if bias is not None:
        shift = shift + bias
    y = x * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())
    return y.to(x.dtype)


class SyncableNorm:
    """Mixin for norm layers with batch statistics that can be synchronized across processes.

    ``synchronized`` and ``process_group`` are plain attributes (not state), switched by
    :class:`bnzoo.plugins.NormSync` and :func:`bnzoo.norms.convert_sync_norms`. A synchronized layer in
    training mode computes global batch moments with :func:`global_batch_moments` whenever more than one
    process takes part; in a single process it behaves exactly as the unsynchronized layer.
    """

    synchronized: bool = False
    process_group: Any = None

    def _sync_active(self) -> bool:
        return bool(self.synchronized and self.training and is_distributed(self.process_group))  # type: ignore[attr-defined]
