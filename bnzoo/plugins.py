"""``NormSync``: a Lightning ``LayerSync`` plugin that synchronizes every norm kind across processes.

``Trainer(strategy="ddp", plugins=[NormSync()])`` (or ``--trainer.plugins bnzoo.plugins.NormSync`` in the CLI)
makes the batch statistics of ``bn``, ``renorm`` and the sequence norms global: each layer all-reduces its
per-channel count, sum and sum of squares (one reduction code path, :mod:`bnzoo.norms.sync`), so outputs,
gradients and running statistics equal those of one process that saw the concatenated batch. It works on the
CPU with gloo, where torch's ``nn.SyncBatchNorm`` refuses to run.

Torch's ``convert_sync_batchnorm`` (what ``Trainer(sync_batchnorm=True)`` does) turns *every* BatchNorm subclass
into a plain ``nn.SyncBatchNorm``: Batch Renorm would silently become BatchNorm and a sequence norm would break.
bnzoo's tasks therefore replace that plugin by ``NormSync`` (with a warning) whenever the model has a bnzoo norm;
:func:`check_layer_sync` does the same for any LightningModule.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .norms.convert import convert_sync_norms, revert_sync_norms
from .norms.introspect import has_bnzoo_norms

__all__ = ["NormSync", "check_layer_sync", "convert_sync_norms", "revert_sync_norms"]


class NormSync(LayerSync):
    """Synchronize every norm kind across processes during ``fit`` (DDP, FSDP).

    Args:
        process_group: the group to synchronize over (None: all processes).
        torch_sync_batchnorm: use torch's fused ``nn.SyncBatchNorm`` for plain ``bn`` layers. None (default)
            decides by device: torch's on CUDA, bnzoo's elsewhere (torch's refuses CPU tensors). Renorm and the
            sequence norms always use bnzoo's synchronization.
    """

    def __init__(self, process_group: Any = None, torch_sync_batchnorm: bool | None = None) -> None:
        self.process_group = process_group
        self.torch_sync_batchnorm = torch_sync_batchnorm

    def _use_torch_sync(self, model: nn.Module) -> bool:
        if self.torch_sync_batchnorm is not None:
            return self.torch_sync_batchnorm
        trainer = getattr(model, "_trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_norms(model, self.process_group, self._use_torch_sync(model))

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_norms(model)


def check_layer_sync(trainer: L.Trainer, model: nn.Module) -> None:
    """Replace Lightning's ``TorchSyncBatchNorm`` (``sync_batchnorm=True``) by :class:`NormSync` when ``model``
    has Batch Renorm or sequence norm layers, which torch's conversion would silently turn into BatchNorm."""
    strategy = trainer.strategy
    layer_sync = getattr(strategy, "_layer_sync", None)
    if isinstance(layer_sync, TorchSyncBatchNorm) and has_bnzoo_norms(model):
        rank_zero_warn(
            "Trainer(sync_batchnorm=True) converts every BatchNorm subclass into torch's plain SyncBatchNorm, which "
            "would turn Batch Renorm into BatchNorm and break sequence norms. bnzoo uses its NormSync plugin "
            "instead, which synchronizes every norm kind with its own semantics."
        )
        strategy._layer_sync = NormSync()
