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
import torch
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .norms.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .norms.sync import SyncableNorm

__all__ = ["NormSync", "check_layer_sync", "convert_sync_norms", "revert_sync_norms"]

# torch's plain BatchNorm classes and their synchronizable bnzoo twins (same kernel, same state dict)
_PLAIN_BATCHNORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    BatchNorm1d: BatchNorm1d,
    BatchNorm2d: BatchNorm2d,
    BatchNorm3d: BatchNorm3d,
}
_ORIGINAL_CLASS = "_bnzoo_original_class"


def _rebuild(module: _BatchNorm, cls: type[nn.Module], **extra: Any) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters and buffers (what convert_sync_batchnorm does)."""
    new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **extra)
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def convert_sync_norms(module: nn.Module, process_group: Any = None, torch_sync_batchnorm: bool = False) -> nn.Module:
    """Synchronize every norm layer of ``module`` across the processes of ``process_group`` (None: all).

    bnzoo's norms (``bn``, ``renorm``, sequence norms) switch to global moments in place; torch's plain
    BatchNorm layers become bnzoo's synchronizable BatchNorm -- or torch's ``nn.SyncBatchNorm`` (CUDA only)
    when ``torch_sync_batchnorm``. Returns the module (a new object if ``module`` itself was replaced).
    """
    if type(module) in _PLAIN_BATCHNORMS and (torch_sync_batchnorm or not isinstance(module, SyncableNorm)):
        target = nn.SyncBatchNorm if torch_sync_batchnorm else _PLAIN_BATCHNORMS[type(module)]
        extra = {"process_group": process_group} if torch_sync_batchnorm else {}
        converted = _rebuild(module, target, **extra)  # type: ignore[arg-type]
        setattr(converted, _ORIGINAL_CLASS, type(module))
        module = converted
    if isinstance(module, SyncableNorm):
        module.synchronized, module.process_group = True, process_group
    for name, child in module.named_children():
        module.add_module(name, convert_sync_norms(child, process_group, torch_sync_batchnorm))
    return module


def revert_sync_norms(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_norms`: every layer back to its original class, synchronization off."""
    original = getattr(module, _ORIGINAL_CLASS, None)
    if original is not None and type(module) is not original:
        module = _rebuild(module, original)  # type: ignore[arg-type]
    if isinstance(module, SyncableNorm):
        module.synchronized, module.process_group = False, None
    for name, child in module.named_children():
        module.add_module(name, revert_sync_norms(child))
    return module


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


def has_bnzoo_norms(model: nn.Module) -> bool:
    """True if ``model`` has a bnzoo norm whose semantics torch's SyncBatchNorm conversion would change."""
    return any(isinstance(m, SyncableNorm) and type(m) not in _PLAIN_BATCHNORMS for m in model.modules())


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


def synchronized_norms(model: nn.Module) -> list[nn.Module]:
    """The norm layers of ``model`` that currently synchronize across processes."""
    return [
        m for m in model.modules()
        if (isinstance(m, SyncableNorm) and m.synchronized) or isinstance(m, torch.nn.SyncBatchNorm)
    ]
