"""Converting a model's norm layers in place: freezing them (:func:`freeze_norms`, as detectron2's
``FrozenBatchNorm2d.convert_frozen_batchnorm``) and switching them to cross-process statistics and back
(:func:`convert_sync_norms` / :func:`revert_sync_norms`, what :class:`bnzoo.plugins.NormSync` applies), each
through the one :func:`~bnzoo.norms.conversion.replace_modules`. Converting to any kind: :mod:`.conversion`."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .conversion import replace_modules
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
    return replace_modules(module, lambda _name, layer: isinstance(layer, _BatchNorm), _frozen_copy)


def _frozen_copy(_name: str, layer: _BatchNorm) -> nn.Module:
    frozen_class = SequenceFrozenBatchNorm if isinstance(layer, SequenceNorm) else FrozenBatchNorm
    frozen = frozen_class.from_batchnorm(layer)
    extras = activation_of(layer)
    return frozen if extras is None else with_activation(frozen, act=extras[1], drop=extras[0])


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


def _set_synchronized(module: nn.Module, synchronized: bool, process_group: Any) -> nn.Module:
    for layer in module.modules():
        if isinstance(layer, SyncableNorm):
            layer.synchronized, layer.process_group = synchronized, process_group
    return module


def convert_sync_norms(module: nn.Module, process_group: Any = None, torch_sync_batchnorm: bool = False) -> nn.Module:
    """Synchronize every norm layer of ``module`` across the processes of ``process_group`` (None: all).

    bnzoo's norms (``bn``, ``renorm``, sequence norms) switch to global moments in place; torch's plain
    BatchNorm layers become bnzoo's synchronizable BatchNorm -- or torch's ``nn.SyncBatchNorm`` (CUDA only)
    when ``torch_sync_batchnorm``. Returns the module (a new object if ``module`` itself was replaced).
    """

    def replaced(_name: str, layer: nn.Module) -> bool:
        return type(layer) in _PLAIN_BATCHNORMS and (torch_sync_batchnorm or not isinstance(layer, SyncableNorm))

    def build(_name: str, layer: nn.Module) -> nn.Module:
        target = nn.SyncBatchNorm if torch_sync_batchnorm else _PLAIN_BATCHNORMS[type(layer)]
        extra = {"process_group": process_group} if torch_sync_batchnorm else {}
        converted = _rebuild(layer, target, **extra)  # type: ignore[arg-type]
        setattr(converted, _ORIGINAL_CLASS, type(layer))
        return converted

    return _set_synchronized(replace_modules(module, replaced, build), True, process_group)


def revert_sync_norms(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_norms`: every layer back to its original class, synchronization off."""

    def replaced(_name: str, layer: nn.Module) -> bool:
        original = getattr(layer, _ORIGINAL_CLASS, None)
        return original is not None and type(layer) is not original

    def build(_name: str, layer: nn.Module) -> nn.Module:
        return _rebuild(layer, getattr(layer, _ORIGINAL_CLASS))  # type: ignore[arg-type]

    return _set_synchronized(replace_modules(module, replaced, build), False, None)
