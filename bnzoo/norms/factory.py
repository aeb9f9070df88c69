"""The norm factory: every norm layer of bnzoo comes from ``make_norm(kind, num_features, layout)``.

A *kind* is a plain string (``"none"``, ``"bn"``, ``"renorm"``, ``"gn"``, ``"ln"``, ``"frozen"``, or one a user
registered); a *layout* says what the layer's input looks like:

========  ==========================  =====================================================
layout    input                       statistics of ``bn``/``renorm`` per channel over
========  ==========================  =====================================================
``1d``    (N, C) or (N, C, L)         N (and L)
``2d``    (N, C, H, W)                N, H, W
``3d``    (N, C, D, H, W)             N, D, H, W
``seq``   (B, T, C) + lengths/mask    the valid steps of every sequence (Deep Speech 2)
========  ==========================  =====================================================

Models never import a norm class: they call :func:`make_norm` (or pass :func:`norm_layer` to timm), so the kind
is a config string everywhere a user meets it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, check_norm_args
from .channel import ChannelGroupNorm, ChannelLayerNorm, default_num_groups
from .frozen import FrozenBatchNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sequence import (
    SequenceBatchNorm,
    SequenceBatchRenorm,
    SequenceFrozenBatchNorm,
    SequenceGroupNorm,
    SequenceIdentity,
    SequenceLayerNorm,
)

__all__ = ["BUILTIN_NORMS", "LAYOUTS", "NormLayer", "list_norms", "make_norm", "norm_layer", "register_norm"]

LAYOUTS: tuple[str, ...] = ("1d", "2d", "3d", "seq")

NormBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class _NormKind:
    name: str
    builder: NormBuilder
    description: str
    options: tuple[str, ...]


_KINDS: dict[str, _NormKind] = {}


def register_norm(name: str, description: str = "") -> Callable[[NormBuilder], NormBuilder]:
    """Register a norm kind. Decorates ``builder(num_features, layout, *, option=default, ...)``.

    The builder's keyword-only parameters are the kind's options; :func:`make_norm` rejects any other option
    with the list of valid ones. Example::

        @register_norm("scaled_bn", "BatchNorm with a fixed output scale")
        def _build(num_features: int, layout: str, *, scale: float = 2.0) -> nn.Module:
            return nn.Sequential(make_norm("bn", num_features, layout), Scale(scale))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a norm kind's name must be a non-empty string, got {name!r}")

    def decorate(builder: NormBuilder) -> NormBuilder:
        if name in _KINDS:
            raise ValueError(f"norm kind {name!r} is already registered")
        params = inspect.signature(builder).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        doc = description or (inspect.getdoc(builder) or "").split("\n")[0]
        _KINDS[name] = _NormKind(name, builder, doc, options)
        return builder

    return decorate


def list_norms() -> list[str]:
    """The registered norm kinds, sorted."""
    return sorted(_KINDS)


def describe_norms() -> dict[str, str]:
    """Each registered kind with its one-line description and options."""
    return {k.name: f"{k.description} (options: {', '.join(k.options) or 'none'})" for k in _KINDS.values()}


def _lookup(kind: Any) -> _NormKind:
    if not isinstance(kind, str) or kind not in _KINDS:
        hint = ""
        if isinstance(kind, str):
            close = difflib.get_close_matches(kind, list(_KINDS), n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown norm kind {kind!r}{hint}; valid kinds: {', '.join(list_norms())}")
    return _KINDS[kind]


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown norm layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    return layout


def make_norm(kind: str, num_features: int, layout: str = "2d", **options: Any) -> nn.Module:
    """Build a norm layer of ``kind`` for ``num_features`` channels of inputs laid out as ``layout``.

    Extra keyword ``options`` pass through to the layer (``eps``, ``momentum``, ``r_max``, ``num_groups``, ...).
    An unknown kind, layout or option fails here, with the valid choices in the message.
    """
    spec = _lookup(kind)
    _check_layout(layout)
    _check_options(spec, options)
    check_norm_args(num_features, 1.0, None)
    return spec.builder(num_features, layout, **options)


def check_norm_config(kind: str, options: dict[str, Any]) -> None:
    """Raise a ValueError for an unknown kind or option, without building a layer."""
    _check_options(_lookup(kind), options)


def _check_options(spec: _NormKind, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise ValueError(
            f"norm kind {spec.name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options for {spec.name!r}: {valid}"
        )


#: what :func:`norm_layer` returns: ``f(num_features, **model_kwargs) -> nn.Module``
NormLayer = Callable[..., nn.Module]


def _build_for_model(
    num_features: int, *, kind: str, layout: str, options: dict[str, Any], **model_kwargs: Any
) -> nn.Module:
    accepted = _KINDS[kind].options
    merged = {k: v for k, v in model_kwargs.items() if k in accepted}
    merged.update(options)
    return make_norm(kind, num_features, layout, **merged)


def norm_layer(kind: str, layout: str = "2d", **options: Any) -> NormLayer:
    """A ``norm_layer(num_features)`` callable of one kind, for constructors that take a norm *class*
    (``timm.create_model(..., norm_layer=norm_layer("renorm", r_max=2.0))``, torchvision's models).

    It is a ``functools.partial`` with keyword arguments only, which timm accepts (and rebinds) and which
    pickles. Keyword arguments that the model's code passes and the kind does not accept (e.g. timm's ``eps``
    for ``none``) are dropped; the user's own ``options`` are validated here, not deep inside a model.
    """
    _check_options(_lookup(kind), options)
    _check_layout(layout)
    return functools.partial(_build_for_model, kind=kind, layout=layout, options=dict(options))


# ----------------------------------------------------------------------------------------------------------
# The built-in kinds


def _by_layout(layout: str, classes: tuple[type[nn.Module], ...]) -> type[nn.Module]:
    return dict(zip(LAYOUTS, classes, strict=True))[layout]


@register_norm("none", "no normalization (identity)")
def _build_none(num_features: int, layout: str) -> nn.Module:
    return SequenceIdentity(num_features) if layout == "seq" else nn.Identity()


@register_norm("bn", "Batch Normalization (Ioffe & Szegedy 2015): torch's BatchNorm")
def _build_bn(
    num_features: int,
    layout: str,
    *,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
) -> nn.Module:
    cls = _by_layout(layout, (BatchNorm1d, BatchNorm2d, BatchNorm3d, SequenceBatchNorm))
    return cls(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)


@register_norm("renorm", "Batch Renormalization (Ioffe 2017)")
def _build_renorm(
    num_features: int,
    layout: str,
    *,
    eps: float = 1e-5,
    momentum: float | None = 0.01,
    r_max: float = 3.0,
    d_max: float = 5.0,
    affine: bool = True,
) -> nn.Module:
    cls = _by_layout(layout, (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SequenceBatchRenorm))
    return cls(num_features, eps=eps, momentum=momentum, r_max=r_max, d_max=d_max, affine=affine)


@register_norm("gn", "Group Normalization (Wu & He 2018)")
def _build_gn(
    num_features: int, layout: str, *, num_groups: int | None = None, eps: float = 1e-5, affine: bool = True
) -> nn.Module:
    groups = default_num_groups(num_features) if num_groups is None else num_groups
    cls = SequenceGroupNorm if layout == "seq" else ChannelGroupNorm
    return cls(num_features, groups, eps=eps, affine=affine)


@register_norm("ln", "Layer Normalization over channels (Ba et al. 2016)")
def _build_ln(num_features: int, layout: str, *, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    cls = SequenceLayerNorm if layout == "seq" else ChannelLayerNorm
    return cls(num_features, eps=eps, affine=affine)


@register_norm("frozen", "BatchNorm with frozen statistics and affine (fine-tuning)")
def _build_frozen(num_features: int, layout: str, *, eps: float = 1e-5) -> nn.Module:
    cls = SequenceFrozenBatchNorm if layout == "seq" else FrozenBatchNorm
    return cls(num_features, eps=eps)


BUILTIN_NORMS: tuple[str, ...] = tuple(list_norms())
"""The kinds bnzoo ships; :func:`list_norms` also lists those registered later (by users, or by
:mod:`bnzoo.experiments`)."""
