"""Norm introspection: the one place that knows which layers of a model are norms, which keep running
statistics, which are Batch Renorm, which synchronize across processes, what rows a call normalizes and the batch
moments of those rows. Recalibration, :class:`bnzoo.plugins.NormSync`, :class:`bnzoo.callbacks.RenormSchedule`
and the diagnostics all ask here, so they agree on what "a norm layer" is."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.rnn import PackedSequence

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, _BatchRenorm, batch_renorm_corrections
from .sequence import SequenceNorm, sequence_mask
from .sync import SyncableNorm, global_batch_moments, is_distributed

__all__ = [
    "NORM_TYPES",
    "PLAIN_BATCHNORMS",
    "batch_moments",
    "has_bnzoo_norms",
    "is_batchnorm_like",
    "is_frozen_batchnorm",
    "is_renorm",
    "keeps_statistics",
    "named_batchnorm_like",
    "norm_layout",
    "named_norm_layers",
    "named_renorm_layers",
    "named_stat_norm_layers",
    "normalized_rows",
    "renorm_correction_stats",
    "row_count",
    "stat_norm_layers",
    "synchronization",
    "synchronized_norms",
]

#: the norm layer types: BatchNorm and Batch Renorm (every layout, torch's included), frozen BN, GroupNorm,
#: LayerNorm (bnzoo's channel norms subclass torch's)
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, FrozenBatchNorm, nn.GroupNorm, nn.LayerNorm)

#: bnzoo's BatchNorm classes (``bn``): the only ones that torch's ``SyncBatchNorm`` may replace
PLAIN_BATCHNORMS: tuple[type[nn.Module], ...] = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def keeps_statistics(layer: nn.Module) -> bool:
    """A norm with running statistics that training updates (bn, renorm, sequence norms, ``SyncBatchNorm``)."""
    return isinstance(layer, _BatchNorm) and layer.track_running_stats


#: the buffers of a frozen BatchNorm (bnzoo's, torchvision's ``ops.FrozenBatchNorm2d``, timm's, detectron2's)
FROZEN_BUFFERS: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var")

#: where a layer's class alone does not say its input's layout, the one it was converted from is kept here
LAYOUT_ATTRIBUTE = "_bnzoo_layout"


def is_frozen_batchnorm(layer: nn.Module) -> bool:
    """A frozen BatchNorm: bnzoo's :class:`FrozenBatchNorm`, or any module (torchvision's, timm's, detectron2's
    ``FrozenBatchNorm2d``) that is no ``_BatchNorm`` and holds ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` as *buffers*, with an ``eps``: ``y = weight * (x - mean) / sqrt(var + eps) + bias``."""
    if isinstance(layer, FrozenBatchNorm):
        return True
    buffers = layer._buffers
    return (
        not isinstance(layer, _BatchNorm)
        and all(buffers.get(name) is not None for name in FROZEN_BUFFERS)
        and isinstance(getattr(layer, "eps", None), (int, float))
        and not isinstance(layer.eps, bool)
    )


def is_batchnorm_like(layer: nn.Module) -> bool:
    """A layer that normalizes with BatchNorm's per-channel statistics (or frozen ones): every ``_BatchNorm``
    (torch's 1d/2d/3d and ``SyncBatchNorm``, timm's ``BatchNormAct2d``, bnzoo's bn, renorm, ghost and sequence
    norms) and every frozen BatchNorm (:func:`is_frozen_batchnorm`). GroupNorm and LayerNorm are not."""
    return isinstance(layer, _BatchNorm) or is_frozen_batchnorm(layer)


def named_batchnorm_like(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` for every BatchNorm-like layer of ``model`` (:func:`is_batchnorm_like`)."""
    return {name: m for name, m in model.named_modules() if is_batchnorm_like(m)}


_LAYOUT_CLASSES: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((SequenceNorm,), "seq"),
    ((nn.BatchNorm1d, BatchRenorm1d), "1d"),
    ((nn.BatchNorm2d, BatchRenorm2d), "2d"),
    ((nn.BatchNorm3d, BatchRenorm3d), "3d"),
)


def norm_layout(layer: nn.Module) -> str | None:
    """The layout (``1d``, ``2d``, ``3d``, ``seq``: :data:`bnzoo.norms.factory.LAYOUTS`) of a BatchNorm-like
    layer's input, from its class (a frozen ``...2d`` class is ``2d``), or the one recorded when bnzoo converted
    it (:data:`LAYOUT_ATTRIBUTE`); None where nothing says (``SyncBatchNorm``, a plain :class:`FrozenBatchNorm`:
    both take any (N, C, *) input)."""
    recorded = getattr(layer, LAYOUT_ATTRIBUTE, None)
    if recorded is not None:
        return recorded
    for classes, layout in _LAYOUT_CLASSES:
        if isinstance(layer, classes):
            return layout
    if is_frozen_batchnorm(layer) and not isinstance(layer, FrozenBatchNorm):
        for layout in ("1d", "2d", "3d"):
            if type(layer).__name__.endswith(layout):
                return layout
    return None


def is_renorm(layer: nn.Module) -> bool:
    """A Batch Renorm layer (Ioffe 2017), any layout."""
    return isinstance(layer, _BatchRenorm)


def named_norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` for every norm layer of ``model`` (:data:`NORM_TYPES`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NORM_TYPES)}


def named_renorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` for every Batch Renorm layer of ``model``."""
    return {name: m for name, m in model.named_modules() if is_renorm(m)}


def has_bnzoo_norms(model: nn.Module) -> bool:
    """Whether ``model`` has a synchronizable bnzoo norm other than plain ``bn`` (which torch's may replace)."""
    return any(isinstance(m, SyncableNorm) and type(m) not in PLAIN_BATCHNORMS for m in model.modules())


def synchronized_norms(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` set to normalize with cross-process moments (bnzoo's or torch's SyncBatchNorm)."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, SyncableNorm) and m.synchronized) or isinstance(m, torch.nn.SyncBatchNorm)
    ]


def named_stat_norm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The norm layers of ``model`` that keep running statistics (:func:`keeps_statistics`), with their names."""
    return [(n, m) for n, m in model.named_modules() if keeps_statistics(m)]


def stat_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The norm layers of ``model`` that keep running statistics (bn, renorm, sequence norms, SyncBatchNorm)."""
    return [m for _, m in named_stat_norm_layers(model)]


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


def row_count(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | Tensor:
    """How many rows (samples x positions) :func:`normalized_rows` would give, without gathering them."""
    x = args[0]
    if isinstance(x, PackedSequence):
        return x.data.shape[0]
    if isinstance(layer, SequenceNorm):
        mask = _sequence_mask(layer, args, kwargs)
        return x.shape[0] * x.shape[1] if mask is None else mask.sum()
    return x.numel() // x.shape[1]


def synchronization(layer: nn.Module) -> tuple[bool, Any]:
    """Whether ``layer``'s training forward normalizes with moments global across processes now, and the
    process group it reduces over (bnzoo's synchronized norms and torch's ``nn.SyncBatchNorm``)."""
    if isinstance(layer, SyncableNorm):
        return layer._sync_active(), layer.process_group
    if isinstance(layer, nn.SyncBatchNorm):
        return bool(layer.training and is_distributed(layer.process_group)), layer.process_group
    return False, None


def batch_moments(
    rows: Tensor, synchronized: bool = False, group: Any = None, shift: Tensor | None = None
) -> tuple[Tensor, Tensor, int | Tensor]:
    """Per-channel mean and biased variance of (N, C, *) ``rows``, and the row count.

    Local rows: the native one-pass kernel. ``synchronized``: the moments of the global batch, the
    concatenation of every process's rows (:func:`~bnzoo.norms.sync.global_batch_moments`, shifted by
    ``shift``; one all-reduce), as a synchronized layer normalizes with them.
    """
    x = rows.detach()
    if synchronized:
        return global_batch_moments(x, shift, group)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean, var, x.numel() // x.shape[1]


@torch.no_grad()
def renorm_correction_stats(layer: nn.Module, rows: Tensor) -> dict[str, float]:
    """The corrections a Batch Renorm ``layer`` applies to a batch (Ioffe 2017, Alg. 1), before its update.

    ``rows`` is what the layer normalizes (:func:`normalized_rows`). Returns the mean of ``r`` and of ``d`` over
    channels (after clipping) and the fraction of channels whose *unclipped* ``sigma_B / sigma`` lies outside
    ``[1/r_max, r_max]`` (``r_clipped``) or ``(mu_B - mu) / sigma`` outside ``[-d_max, d_max]`` (``d_clipped``):
    the one definition of "clipped" in bnzoo.
    """
    mean, var = torch.batch_norm_update_stats(rows.float(), None, None, 0.0)
    batch_std = (var + layer.eps).sqrt()
    running_std = (layer.running_var + layer.eps).sqrt()
    r, d = batch_renorm_corrections(mean, batch_std, layer.running_mean, running_std, layer.r_max, layer.d_max)
    raw_r = batch_std / running_std
    raw_d = (mean - layer.running_mean) / running_std
    return {
        "r_mean": float(r.mean()),
        "d_mean": float(d.mean()),
        "r_clipped": float(((raw_r > layer.r_max) | (raw_r < 1.0 / layer.r_max)).float().mean()),
        "d_clipped": float((raw_d.abs() > layer.d_max).float().mean()),
    }
