"""Converting a model's norm layers in place: freezing them (:func:`freeze_norms`, as detectron2's
``FrozenBatchNorm2d.convert_frozen_batchnorm``) and switching them to cross-process statistics and back
(:func:`convert_sync_norms` / :func:`revert_sync_norms`, what :class:`bnzoo.plugins.NormSync` applies)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm
from .norm_act import activation_of, with_activation
from .sequence import SequenceFrozenBatchNorm, SequenceNorm
from .sync import SyncableNorm

__all__ = ["convert_sync_norms", "freeze_norms", "revert_sync_norms"]


def freeze_norms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm-like layer (``bn``, ``renorm``, their sequence variants) of ``module`` by a frozen
    copy: :class:`FrozenBatchNorm`, or ``SequenceFrozenBatchNorm`` for the (batch, time, features) layers.

    A norm + activation layer (bnzoo's :func:`~bnzoo.norms.norm_act.with_activation`, timm's ``BatchNormAct2d``)
    stays one: the frozen copy keeps its ``drop`` and ``act``. Returns the converted module (a new object when
    ``module`` itself is such a layer).
    """
    if isinstance(module, _BatchNorm):
        frozen_class = SequenceFrozenBatchNorm if isinstance(module, SequenceNorm) else FrozenBatchNorm
        frozen = frozen_class.from_batchnorm(module)
        extras = activation_of(module)
        return frozen if extras is None else with_activation(frozen, act=extras[1], drop=extras[0])
    for name, child in module.named_children():
        converted = freeze_norms(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


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
