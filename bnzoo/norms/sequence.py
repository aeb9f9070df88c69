"""Sequence-wise, padding-aware normalization for (batch, time, features) inputs.

Deep Speech 2 (Amodei et al. 2016, Sec. 3.2) normalizes a recurrent layer's input term sequence-wise: the
statistics of each feature are taken over every time step of every sequence in the mini-batch. With padded
batches only the real steps count: each layer here gathers the valid steps of the (B, T, C) input into an
(M, C) matrix, applies its channel norm to those M rows (for ``bn``: exactly ``nn.BatchNorm1d`` on the unpadded
steps, statistics and running statistics included), and scatters the result back, so padded outputs are zero
and results do not depend on how much padding a batch carries.

Every layer takes ``forward(x, lengths=None, mask=None)``: ``lengths`` (B,) gives each sequence's number of
valid leading steps; ``mask`` (B, T) marks valid steps with True. Without either, every step is valid. A
``PackedSequence`` is accepted too and is the fast path: its data already holds just the valid steps, so the
layer costs what ``nn.BatchNorm1d`` costs on them. With a padded tensor the valid steps are gathered by index
(``index_select``, the indices computed once per call) and written back into zeros with ``index_copy_``; see
benchmarks/rnn.py for what that costs against ``nn.BatchNorm1d`` on the valid rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .batchnorm import BatchNorm1d, check_channels, check_norm_args
from .channel import ChannelGroupNorm, ChannelLayerNorm
from .frozen import FrozenBatchNorm
from .masked import masked_batch_norm
from .renorm import BatchRenorm1d

__all__ = [
    "SequenceBatchNorm",
    "SequenceBatchRenorm",
    "SequenceFrozenBatchNorm",
    "SequenceGroupNorm",
    "SequenceIdentity",
    "SequenceLayerNorm",
    "SequenceNorm",
    "lengths_to_mask",
    "sequence_mask",
    "with_packed_data",
]


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool mask, True at the first ``lengths[b]`` steps of each sequence."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) < lengths.to(steps.device).unsqueeze(1)


def with_packed_data(packed: PackedSequence, data: Tensor) -> PackedSequence:
    """``packed`` with its data replaced by ``data`` (same rows, e.g. normalized).

    Built with the constructor: ``packed._replace(data=...)`` returns an *empty* tuple under ``torch.compile``
    (torch 2.14), which fails far away, in whatever unpacks it.
    """
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def sequence_mask(
    batch: int, steps: int, lengths: Tensor | None = None, mask: Tensor | None = None, device: Any = None
) -> Tensor | None:
    """The (B, T) validity mask from ``lengths`` or ``mask``, or None when every step is valid.

    Raises a ValueError naming the bad shape or value, rather than an indexing error deep in torch, and a
    TypeError for lengths that are not integers (a float length would be rounded up silently) or a mask that
    is neither bool nor 0/1 integers.
    """
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=device)
        if torch.is_floating_point(lengths) or torch.is_complex(lengths) or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor (valid steps per sequence), got dtype {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > steps:
            raise ValueError(f"lengths must lie in [1, {steps}] (the padded length), got min {lo}, max {hi}")
        if lo == steps:
            return None
        return lengths_to_mask(lengths, steps)
    if mask is not None:
        if mask.shape != (batch, steps):
            raise ValueError(f"mask must have shape ({batch}, {steps}), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and (mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any())):
            raise TypeError(f"mask must be bool (or integers 0 and 1) marking the valid steps, got {mask.dtype} values")
        mask = mask.to(device=device, dtype=torch.bool)
        return None if bool(mask.all()) else mask
    return None


class _GatherRows(torch.autograd.Function):
    """``x[rows]`` for distinct row indices; the backward pass writes the gradient rows into zeros.

    ``index_select`` and ``index_copy_`` (no accumulation: the rows are distinct) are several times faster on
    a CPU than the boolean-mask gather ``x[mask]`` and its backward, an accumulating ``index_put_``; each
    Function's backward pass is the other Function, so double backward works too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return _ScatterRows.apply(grad, rows, ctx.num_rows), None


class _ScatterRows(torch.autograd.Function):
    """(num_rows, C) zeros with ``out[rows] = values``: the inverse of :class:`_GatherRows`."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, rows: Tensor, num_rows: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        return values.new_zeros(num_rows, *values.shape[1:]).index_copy_(0, rows, values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return _GatherRows.apply(grad, rows), None, None


class SequenceNorm:
    """Mixin: apply the channel norm it is mixed into to the valid steps of a (B, T, C) sequence only."""

    num_features: int

    def _padded_forward(self, rows: Tensor, valid: Tensor) -> Tensor | None:
        """The output for the (B T, C) ``rows`` with the (B T,) ``valid`` mask, padded rows 0, computed on
        the padded rows directly; None where the layer has no such path (then the valid rows are gathered)."""
        return None

    def forward(
        self, x: Tensor | PackedSequence, lengths: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor | PackedSequence:
        if isinstance(x, PackedSequence):  # the valid steps already, as (M, C) rows: no gather, no scatter
            if lengths is not None or mask is not None:
                raise ValueError("a PackedSequence carries its own lengths: pass neither lengths nor mask")
            if x.data.dim() != 2 or x.data.shape[-1] != self.num_features:
                raise ValueError(
                    f"{type(self).__name__}({self.num_features}) expects packed data of shape "
                    f"(M, {self.num_features}), got {tuple(x.data.shape)}"
                )
            return with_packed_data(x, super().forward(x.data))  # type: ignore[misc]
        if x.dim() != 3 or x.shape[-1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects (batch, time, {self.num_features}) "
                f"inputs, got {tuple(x.shape)}"
            )
        batch, steps, channels = x.shape
        valid = sequence_mask(batch, steps, lengths, mask, x.device)
        if valid is None:
            return super().forward(x.reshape(batch * steps, channels)).view(batch, steps, channels)  # type: ignore[misc]
        padded = self._padded_forward(x.reshape(batch * steps, channels), valid.reshape(-1))
        if padded is not None:
            return padded.view(batch, steps, channels)
        rows = valid.reshape(-1).nonzero().squeeze(1)  # the valid rows' indices, once per forward
        normalized = super().forward(_GatherRows.apply(x.reshape(batch * steps, channels), rows))  # type: ignore[misc]
        return _ScatterRows.apply(normalized, rows, batch * steps).view(batch, steps, channels)


class SequenceBatchNorm(SequenceNorm, BatchNorm1d):
    """Sequence-wise BatchNorm (Deep Speech 2): statistics per feature over the batch's valid steps.

    Equal to ``nn.BatchNorm1d`` applied to the unpadded steps only, running statistics included. In training
    on a padded float32/float64 batch it computes that without gathering the valid steps, with a float mask
    (:func:`bnzoo.norms.masked.masked_batch_norm`; padded entries must then be finite).
    """

    def _padded_forward(self, rows: Tensor, valid: Tensor) -> Tensor | None:
        if not self.training or rows.dtype not in (torch.float32, torch.float64) or self._sync_active():
            return None
        if torch.compiler.is_compiling() or torch.is_autocast_enabled(rows.device.type):
            return None  # compile: the traced gather path; autocast would run the mask's sums in bf16
        check_channels(self, rows)
        return masked_batch_norm(
            rows,
            valid,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.num_batches_tracked if self.track_running_stats else None,
            self.momentum,
            self.eps,
        )


class SequenceBatchRenorm(SequenceNorm, BatchRenorm1d):
    """Sequence-wise Batch Renormalization (Ioffe 2017) over the batch's valid steps."""


class SequenceFrozenBatchNorm(SequenceNorm, FrozenBatchNorm):
    """Frozen BatchNorm per feature, applied to valid steps; padded outputs are zero."""


class SequenceLayerNorm(SequenceNorm, ChannelLayerNorm):
    """LayerNorm over the features of each valid step; padded outputs are zero."""


class SequenceGroupNorm(SequenceNorm, ChannelGroupNorm):
    """GroupNorm over the features of each valid step; padded outputs are zero."""


class _RowIdentity(nn.Module):
    """Identity on (M, C) rows, with the ``num_features`` every norm here has."""

    def __init__(self, num_features: int) -> None:
        check_norm_args(num_features, 1.0, None)
        super().__init__()
        self.num_features = num_features

    def forward(self, rows: Tensor) -> Tensor:
        return rows

    def extra_repr(self) -> str:
        return str(self.num_features)


class SequenceIdentity(SequenceNorm, _RowIdentity):
    """No normalization; padded outputs are zero like every other sequence norm's."""
