"""Any model's norm layers as any bnzoo kind: :func:`convert_norms` and back to torch's, :func:`revert_norms`.

torch has ``SyncBatchNorm.convert_sync_batchnorm`` (which drops a BatchNorm subclass's own forward), detectron2
``FrozenBatchNorm2d.convert_frozen_batchnorm``, timm ``freeze_batch_norm_2d``; each converts to one kind.
:func:`convert_norms` turns every *BatchNorm-like* layer (:func:`~bnzoo.norms.introspect.is_batchnorm_like`:
torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, timm's ``BatchNormAct2d`` and ``FrozenBatchNorm2d``,
torchvision's and detectron2-style frozen BN, bnzoo's own) into the layer :func:`~bnzoo.norms.make_norm` builds
for the asked kind, keeping what means the same in both:

* the affine ``weight`` and ``bias`` (parameters or a frozen layer's buffers), and ``running_mean``,
  ``running_var``, ``num_batches_tracked``: between ``bn``, ``renorm`` and ``frozen`` the eval outputs are the
  same, since each normalizes at inference with ``weight * (x - mean) / sqrt(var + eps) + bias`` (Ioffe &
  Szegedy 2015, Alg. 2; Ioffe 2017, Alg. 1, inference), and so are the state-dict keys (frozen has no
  ``num_batches_tracked``);
* the source layer's own settings that the kind takes as options (``eps``, ``momentum``, ``affine``,
  ``track_running_stats``, ``r_max``, ``virtual_batch_size``, ...), overridden by the ``options`` given;
* a norm + activation layer's ``drop`` and ``act`` modules (timm's ``BatchNormAct2d``: the same objects, via
  :func:`~bnzoo.norms.norm_act.with_activation`), and each layer's training mode, device and dtype.

To a kind without running statistics (``gn``, ``ln``) the affine is copied and the statistics are dropped, said in
one warning; a layer without running statistics (``track_running_stats=False``) is refused by a kind that would
use them at inference. GroupNorm and LayerNorm layers are not BatchNorm-like and stay as they are: a model with
no BatchNorm-like layer (ConvNeXt: LayerNorm) is returned unchanged, with a warning that says so.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .factory import LAYOUTS, NORM_KINDS, check_norm_config, make_norm
from .frozen import FrozenBatchNorm
from .introspect import LAYOUT_ATTRIBUTE, named_batchnorm_like, named_norm_layers, norm_layout
from .norm_act import activation_of, with_activation
from .sync import SyncableNorm

__all__ = ["convert_norms", "replace_modules", "revert_norms", "select_norm_layers"]

Patterns = str | Sequence[str] | None

#: the tensors a conversion carries over, where both layers have them: the affine, then the statistics
AFFINE: tuple[str, ...] = ("weight", "bias")
STATISTICS: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")


def replace_modules(
    model: nn.Module, predicate: Callable[[str, nn.Module], bool], build: Callable[[str, nn.Module], nn.Module]
) -> nn.Module:
    """Replace every submodule ``m`` named ``name`` (as ``named_modules`` names it) with
    ``predicate(name, m)`` by ``build(name, m)``, in place; a replaced module's children are not visited.

    A module reachable under several names is built once and stays shared. Returns ``model``, or what
    ``build`` returned for it when ``model`` itself matches (its name is ``""``).
    """
    built: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):  # every slot: named_children skips repeats
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in built:
                parent.add_module(child_name, built[id(child)])
            elif predicate(name, child):
                built[id(child)] = build(name, child)
                parent.add_module(child_name, built[id(child)])
            else:
                built[id(child)] = child
                visit(child, name)

    if predicate("", model):
        return build("", model)
    visit(model, "")
    return model


def _pattern_tuple(patterns: Patterns, what: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    items = (patterns,) if isinstance(patterns, str) else tuple(patterns) if isinstance(patterns, Sequence) else ()
    if not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{what} must be a module-name pattern or a list of them (fnmatch), got {patterns!r}")
    return items


def select_norm_layers(model: nn.Module, include: Patterns = None, exclude: Patterns = None) -> dict[str, nn.Module]:
    """``{name: layer}`` of the BatchNorm-like layers of ``model`` whose name matches a pattern of ``include``
    (None: every one) and none of ``exclude`` (shell-style ``fnmatch`` patterns: ``"layer1.*"``,
    ``"*.downsample.*"``). A pattern that matches no BatchNorm-like layer is an error naming some that exist."""
    candidates = named_batchnorm_like(model)
    selected = dict(candidates)
    for what, patterns in (
        ("include", _pattern_tuple(include, "include")),
        ("exclude", _pattern_tuple(exclude, "exclude")),
    ):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
                shown = ", ".join(list(candidates)[:8]) + (", ..." if len(candidates) > 8 else "")
                raise ValueError(
                    f"{what} pattern {pattern!r} matches no BatchNorm-like layer of {type(model).__name__}; "
                    f"its BatchNorm-like layers: {shown or 'none'}"
                )
        if patterns:
            keep = what == "include"
            selected = {n: m for n, m in selected.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns) is keep}
    return selected


def _copy_state(source: nn.Module, target: nn.Module) -> set[str]:
    """Copy the affine and statistics that both layers hold (``requires_grad`` of a parameter copied from a
    parameter included); returns what ``source`` had and ``target`` has no place for."""
    dropped = set()
    with torch.no_grad():
        for group, names in (("affine parameters", AFFINE), ("running statistics", STATISTICS)):
            for name in names:
                value, slot = getattr(source, name, None), getattr(target, name, None)
                if not isinstance(value, torch.Tensor):
                    continue
                if not isinstance(slot, torch.Tensor):
                    if name != "num_batches_tracked":  # a count, not a statistic: frozen BN has none
                        dropped.add(group)
                    continue
                slot.copy_(value)
                if isinstance(slot, nn.Parameter) and isinstance(value, nn.Parameter):
                    slot.requires_grad_(value.requires_grad)
    return dropped


def _placement(layer: nn.Module) -> dict[str, Any]:
    for name in ("weight", "running_mean"):
        value = getattr(layer, name, None)
        if isinstance(value, torch.Tensor):
            return {"device": value.device, "dtype": value.dtype}
    return {}


def _layout(name: str, layer: nn.Module, layout: str | None) -> str:
    found = norm_layout(layer) or layout
    if found is None:
        raise ValueError(
            f"layer {name!r} ({type(layer).__name__}) takes any (N, C, *) input, so its layout is not known: pass "
            f"layout= one of {', '.join(LAYOUTS)}"
        )
    return found


def _finish(name: str, source: nn.Module, target: nn.Module, layout: str) -> tuple[nn.Module, set[str]]:
    """``target`` with ``source``'s state, placement, training mode, layout record and ``drop`` / ``act``."""
    target = target.to(**_placement(source))
    dropped = _copy_state(source, target)
    target.train(source.training)
    if norm_layout(target) != layout:
        setattr(target, LAYOUT_ATTRIBUTE, layout)
    extras = activation_of(source)
    if extras is not None and activation_of(target) is None:
        target = with_activation(target, act=extras[1], drop=extras[0])
    return target, dropped


def _has_statistics(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "running_mean", None), torch.Tensor)


def _num_features(layer: nn.Module) -> int:
    return (layer.running_mean if _has_statistics(layer) else layer.weight).numel()


def _as_kind(
    name: str, layer: nn.Module, kind: str, layout: str | None, options: dict[str, Any]
) -> tuple[nn.Module, set[str]]:
    spec = NORM_KINDS.get(kind)
    layout = _layout(name, layer, layout)
    carried = {
        option: getattr(layer, option)
        for option in spec.options
        if hasattr(layer, option)
        and (getattr(layer, option) is None or isinstance(getattr(layer, option), (int, float)))
    }
    target = make_norm(kind, _num_features(layer), layout, **{**carried, **options})
    if not _has_statistics(layer) and _has_statistics(target) and "track_running_stats" not in options:
        raise ValueError(
            f"layer {name!r} ({type(layer).__name__}) has no running statistics (track_running_stats=False: it "
            f"normalizes with each batch's own statistics at inference too); norm kind {kind!r} would normalize "
            "with running statistics it does not have. Exclude it, or pass track_running_stats to a kind that takes it"
        )
    return _finish(name, layer, target, layout)


def _warn_nothing(model: nn.Module, kind: str, stacklevel: int) -> None:
    others = Counter(type(m).__name__ for m in named_norm_layers(model).values())
    listed = ", ".join(f"{cls} x {n}" for cls, n in sorted(others.items())) or "none"
    warnings.warn(
        f"{type(model).__name__} has no BatchNorm-like layer (its norm layers: {listed}): nothing converted to "
        f"{kind!r}. GroupNorm and LayerNorm layers have no batch statistics to carry over and stay as they are",
        stacklevel=stacklevel + 1,
    )


def _warn_dropped(kind: str, dropped: dict[str, set[str]], stacklevel: int) -> None:
    if not dropped:
        return
    what = sorted(set().union(*dropped.values()))
    names = list(dropped)
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} layers)" if len(names) > 5 else "")
    warnings.warn(
        f"norm kind {kind!r} has no place for the {' and '.join(what)} of {shown}: dropped (the affine "
        "parameters, where the kind has them, were copied)",
        stacklevel=stacklevel + 1,
    )


def convert_norms(
    model: nn.Module,
    kind: str,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    layout: str | None = None,
    **options: Any,
) -> nn.Module:
    """Every BatchNorm-like layer of ``model`` (those named by ``include`` / ``exclude``, fnmatch patterns of
    module names) as norm ``kind`` with ``options``, in place (see the module doc for what is kept).

    ``layout``: for layers whose class does not say it (``SyncBatchNorm``, bnzoo's plain ``FrozenBatchNorm``).
    Returns ``model`` (a new module when ``model`` itself is a norm layer). A bad kind, option, pattern or layout
    is a ValueError naming it and the valid choices; where nothing is BatchNorm-like, a warning and no change.

    >>> import torchvision
    >>> net = convert_norms(torchvision.models.resnet18(), "renorm", exclude="*.downsample.*", r_max=2.0)
    """
    check_norm_config(kind, options)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown norm layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if not named_batchnorm_like(model):
        _warn_nothing(model, kind, stacklevel=2)
        return model
    selected = select_norm_layers(model, include, exclude)
    dropped: dict[str, set[str]] = {}

    def build(name: str, layer: nn.Module) -> nn.Module:
        converted, lost = _as_kind(name, layer, kind, layout, options)
        if lost:
            dropped[name] = lost
        return converted

    model = replace_modules(model, lambda name, layer: name in selected and layer is selected[name], build)
    _warn_dropped(kind, dropped, stacklevel=2)
    return model


def _is_bnzoo_batchnorm(layer: nn.Module) -> bool:
    return isinstance(layer, (SyncableNorm, FrozenBatchNorm))


def _as_torch(name: str, layer: nn.Module, layout: str | None) -> nn.Module:
    layout = _layout(name, layer, layout)
    norm_act = activation_of(layer) is not None
    if layout == "seq" or (norm_act and layout != "2d"):
        what = "a sequence norm (batch, time, features)" if layout == "seq" else f"a {layout} norm + activation"
        raise ValueError(f"layer {name!r} ({type(layer).__name__}) is {what}: torch and timm have no such layer")
    settings = {
        "eps": layer.eps,
        "momentum": getattr(layer, "momentum", 0.1),
        "affine": getattr(layer, "affine", True),
        "track_running_stats": getattr(layer, "track_running_stats", True),
    }
    if norm_act:
        from timm.layers import BatchNormAct2d

        target: nn.Module = BatchNormAct2d(_num_features(layer), apply_act=False, **settings)
        target.drop, target.act = activation_of(layer)  # type: ignore[misc]
    else:
        cls = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[layout]
        target = cls(_num_features(layer), **settings)
    return _finish(name, layer, target, layout)[0]


def revert_norms(
    model: nn.Module, *, include: Patterns = None, exclude: Patterns = None, layout: str | None = None
) -> nn.Module:
    """bnzoo's BatchNorm-like layers of ``model`` (bn, renorm, frozen, ghost; selected as in
    :func:`convert_norms`) back to torch's ``nn.BatchNorm1d/2d/3d``, or timm's ``BatchNormAct2d`` for a norm +
    activation layer (its ``drop`` and ``act`` kept), with the same affine and statistics: the same eval outputs.

    In training the plain layers normalize with batch statistics (a reverted renorm or frozen layer trains as
    BatchNorm; a frozen layer's buffers become learnable parameters). Sequence norms have no torch counterpart
    and are refused by name; torch's, timm's and torchvision's own layers and GroupNorm/LayerNorm stay as they are.
    """
    selected = {n: m for n, m in select_norm_layers(model, include, exclude).items() if _is_bnzoo_batchnorm(m)}
    return replace_modules(
        model, lambda name, layer: name in selected and layer is selected[name], lambda n, m: _as_torch(n, m, layout)
    )
