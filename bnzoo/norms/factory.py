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

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..registry import Registry, check_options
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, check_norm_args
from .channel import ChannelGroupNorm, ChannelLayerNorm, default_num_groups
from .frozen import FrozenBatchNorm
from .ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostBatchRenorm1d,
    GhostBatchRenorm2d,
    GhostBatchRenorm3d,
    check_virtual_batch_size,
)
from .norm_act import create_activation, with_activation
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sequence import (
    SequenceBatchNorm,
    SequenceBatchRenorm,
    SequenceFrozenBatchNorm,
    SequenceGroupNorm,
    SequenceIdentity,
    SequenceLayerNorm,
)

__all__ = [
    "BUILTIN_NORMS",
    "LAYOUTS",
    "NORM_ACT_ARGUMENTS",
    "NORM_KINDS",
    "KindLayer",
    "NormFactory",
    "NormKind",
    "NormLayerCallable",
    "check_norm_config",
    "list_norms",
    "make_norm",
    "norm_factory",
    "norm_layer",
    "register_norm",
    "register_with_timm",
]

LAYOUTS: tuple[str, ...] = ("1d", "2d", "3d", "seq")

NormBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormKind:
    """A registered norm kind: its builder, one-line description, options (the builder's keyword-only
    parameters) and whether its layers are the identity (``none``: models then add what the norm would have
    provided, e.g. SkipInit or a bias)."""

    name: str
    builder: NormBuilder
    description: str
    options: tuple[str, ...]
    identity: bool = False


NORM_KINDS: Registry[NormKind] = Registry("norm kind", "kinds")


def register_norm(name: str, description: str = "", *, identity: bool = False) -> Callable[[NormBuilder], NormBuilder]:
    """Register a norm kind. Decorates ``builder(num_features, layout, *, option=default, ...)``.

    The builder's keyword-only parameters are the kind's options; :func:`make_norm` rejects any other option
    with the list of valid ones. ``identity=True`` says the kind normalizes nothing (as ``none``). Example::

        @register_norm("scaled_bn", "BatchNorm with a fixed output scale")
        def _build(num_features: int, layout: str, *, scale: float = 2.0) -> nn.Module:
            return nn.Sequential(make_norm("bn", num_features, layout), Scale(scale))
    """

    def decorate(builder: NormBuilder) -> NormBuilder:
        params = inspect.signature(builder).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        doc = description or (inspect.getdoc(builder) or "").split("\n")[0]
        NORM_KINDS.register(name, NormKind(name, builder, doc, options, identity))
        return builder

    return decorate


def list_norms() -> list[str]:
    """The registered norm kinds, sorted."""
    return NORM_KINDS.names()


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown norm layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    return layout


def make_norm(kind: str, num_features: int, layout: str = "2d", **options: Any) -> nn.Module:
    """Build a norm layer of ``kind`` for ``num_features`` channels of inputs laid out as ``layout``.

    Extra keyword ``options`` pass through to the layer (``eps``, ``momentum``, ``r_max``, ``num_groups``, ...).
    An unknown kind, layout or option fails here, with the valid choices in the message.
    """
    spec = NORM_KINDS.get(kind)
    _check_layout(layout)
    check_options("norm kind", kind, options, spec.options)
    check_norm_args(num_features, 1.0, None)
    return spec.builder(num_features, layout, **options)


def check_norm_config(kind: str, options: dict[str, Any]) -> None:
    """Raise a ValueError for an unknown kind or option, without building a layer."""
    check_options("norm kind", kind, options, NORM_KINDS.get(kind).options)


@dataclass(frozen=True)
class NormFactory:
    """One norm kind with its options, decided once by a model's entry point and passed down to every layer that
    needs a norm: ``factory(num_features, layout="2d")`` is ``make_norm(kind, num_features, layout, **options)``.

    Models ask the factory, never the kind's name: ``factory.is_identity`` (the ``none`` kind, or any kind
    registered with ``identity=True``) is how a model knows there is no norm.
    """

    kind: str = "bn"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise TypeError(f"norm_options must be a dict of options of the norm kind or None, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))
        check_norm_config(self.kind, self.options)

    def __call__(self, num_features: int, layout: str = "2d") -> nn.Module:
        return make_norm(self.kind, num_features, layout, **self.options)

    @property
    def is_identity(self) -> bool:
        return NORM_KINDS.get(self.kind).identity

    def timm_layer(self, layout: str = "2d") -> NormLayerCallable:
        """This kind as the ``norm_layer`` argument of timm's and torchvision's constructors (:func:`norm_layer`)."""
        return norm_layer(self.kind, layout, **self.options)


def norm_factory(norm: str | NormFactory = "bn", norm_options: Mapping[str, Any] | None = None) -> NormFactory:
    """The :class:`NormFactory` of a model entry point's ``norm`` and ``norm_options`` (validated here, so a bad
    kind or option fails before any layer is built)."""
    if isinstance(norm, NormFactory):
        if norm_options:
            raise ValueError("norm_options must be empty when norm is already a NormFactory")
        return norm
    return NormFactory(norm, {} if norm_options is None else norm_options)


#: what :func:`norm_layer` returns: ``f(num_features, **model_kwargs) -> nn.Module``
NormLayerCallable = Callable[..., nn.Module]

#: the arguments of timm's norm + activation layers (``BatchNormAct2d``): their presence asks for one
NORM_ACT_ARGUMENTS: tuple[str, ...] = ("act_layer", "apply_act", "act_kwargs", "inplace", "drop_layer")


class KindLayer:
    """The callable behind :func:`norm_layer`: ``KindLayer(num_features, kind=..., layout=..., options=...,
    **model_kwargs)`` *returns the norm layer* (``__new__`` builds it; no ``KindLayer`` is ever made).

    It is a type, not a function, because timm's ``get_norm_act_layer`` passes the model's ``act_layer`` only
    to the norm + activation *types* it knows; :func:`register_with_timm` adds this one. Called

    * as a plain norm layer (``f(num_features, eps=..., device=..., dtype=...)``: timm's ResNet, torchvision):
      ``make_norm(kind, num_features, layout, ...)``, with the model's keyword arguments that the kind accepts
      (``eps``, ``momentum``, ...) under the user's ``options``, on ``device`` / in ``dtype``;
    * as a norm + activation layer (any of :data:`NORM_ACT_ARGUMENTS` given: timm's EfficientNet, MobileNet,
      RegNet, Inception-v3, ...): that norm, then ``drop_layer()`` and timm's activation, exactly as timm's
      ``BatchNormAct2d`` (:func:`bnzoo.norms.norm_act.with_activation`).
    """

    def __new__(  # type: ignore[misc]
        cls, num_features: int, *, kind: str, layout: str, options: dict[str, Any], **model_kwargs: Any
    ) -> nn.Module:
        norm_act = {key: model_kwargs.pop(key) for key in NORM_ACT_ARGUMENTS if key in model_kwargs}
        placement = {key: value for key in ("device", "dtype") if (value := model_kwargs.pop(key, None)) is not None}
        accepted = NORM_KINDS.get(kind).options
        merged = {key: value for key, value in model_kwargs.items() if key in accepted}
        merged.update(options)
        layer = make_norm(kind, num_features, layout, **merged)
        if placement:
            layer = layer.to(**placement)
        if not norm_act:
            return layer
        drop_layer = norm_act.pop("drop_layer", None)
        act = create_activation(norm_act.pop("act_layer", None), **norm_act)
        return with_activation(layer, act, drop_layer() if drop_layer is not None else None)


def register_with_timm() -> bool:
    """Make timm's ``get_norm_act_layer`` treat :class:`KindLayer` as a norm + activation layer that takes
    ``act_layer`` (as it treats its own ``BatchNormAct2d``). Returns False, with a warning, if this timm has
    no such registry (its CNNs would then build bnzoo's norms without their activations)."""
    try:
        from timm.layers import create_norm_act
    except ImportError:
        return False
    registries = [getattr(create_norm_act, name, None) for name in ("_NORM_ACT_TYPES", "_NORM_ACT_REQUIRES_ARG")]
    if not all(isinstance(registry, set) for registry in registries):
        warnings.warn(
            "timm.layers.create_norm_act has no _NORM_ACT_TYPES/_NORM_ACT_REQUIRES_ARG sets in this timm version: "
            "bnzoo's norm_layer cannot receive timm's act_layer, and timm models that combine norm and activation "
            "layers would lose their activations",
            stacklevel=2,
        )
        return False
    for registry in registries:
        registry.add(KindLayer)
    return True


def norm_layer(kind: str, layout: str = "2d", **options: Any) -> NormLayerCallable:
    """A ``norm_layer(num_features)`` callable of one kind, for constructors that take a norm *class*
    (``timm.create_model(..., norm_layer=norm_layer("renorm", r_max=2.0))``, torchvision's models).

    It is a ``functools.partial`` of :class:`KindLayer` with keyword arguments only, which timm accepts (and
    rebinds) and which pickles. Where timm asks for a norm + activation layer it gets one, with the network's
    own activation (see :class:`KindLayer`). Keyword arguments that the model's code passes and the kind does
    not accept (e.g. timm's ``eps`` for ``none``) are dropped; the user's own ``options`` are validated here,
    not deep inside a model.
    """
    check_norm_config(kind, options)
    _check_layout(layout)
    register_with_timm()
    return functools.partial(KindLayer, kind=kind, layout=layout, options=dict(options))


# ----------------------------------------------------------------------------------------------------------
# The built-in kinds


def _by_layout(layout: str, classes: tuple[type[nn.Module], ...]) -> type[nn.Module]:
    return dict(zip(LAYOUTS, classes, strict=True))[layout]


def _ghost_options(kind: str, layout: str, virtual_batch_size: Any) -> dict[str, int]:
    """The ghost-batch constructor argument, or nothing; refuses the sequence layout by name (its batch
    statistics are over the valid steps of all sequences, which a group of whole samples does not split)."""
    if check_virtual_batch_size(virtual_batch_size) is None:
        return {}
    if layout == "seq":
        raise ValueError(
            f"norm kind {kind!r}: virtual_batch_size is not supported for the 'seq' layout (statistics over the "
            "valid steps of every sequence); use it with the 1d, 2d or 3d layouts"
        )
    return {"virtual_batch_size": virtual_batch_size}


@register_norm("none", "no normalization (identity)", identity=True)
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
    virtual_batch_size: int | None = None,
) -> nn.Module:
    """``virtual_batch_size=k``: ghost batches of k consecutive samples (:mod:`bnzoo.norms.ghost`)."""
    ghost = _ghost_options("bn", layout, virtual_batch_size)
    plain = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SequenceBatchNorm)
    cls = _by_layout(layout, (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, None) if ghost else plain)
    return cls(
        num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats, **ghost
    )


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
    virtual_batch_size: int | None = None,
) -> nn.Module:
    """``virtual_batch_size=k``: ghost batches of k consecutive samples, r and d per group
    (:mod:`bnzoo.norms.ghost`)."""
    ghost = _ghost_options("renorm", layout, virtual_batch_size)
    plain = (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SequenceBatchRenorm)
    cls = _by_layout(layout, (GhostBatchRenorm1d, GhostBatchRenorm2d, GhostBatchRenorm3d, None) if ghost else plain)
    return cls(num_features, eps=eps, momentum=momentum, r_max=r_max, d_max=d_max, affine=affine, **ghost)


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
:mod:`bnzoo_lab`, inside its registry scope)."""

if "timm" in sys.modules:  # e.g. a pickled norm_layer loaded in a process that already uses timm
    register_with_timm()
