"""A norm layer followed by its activation (and dropout) in one module, as timm's ``BatchNormAct2d``.

timm's CNNs (EfficientNet, MobileNet, RegNet, Inception-v3, ...) do not put an activation after their norm
layers: they ask ``timm.layers.get_norm_act_layer(norm_layer, act_layer)`` for a *norm + activation* layer and
call it as ``f(num_features, apply_act=..., act_kwargs=..., inplace=..., drop_layer=...)``. A norm layer
that ignores those arguments silently drops the network's activations (``efficientnet_b0`` kept 16 of its 49
SiLU). :func:`with_activation` turns any bnzoo norm into the same thing timm's ``BatchNormAct2d`` is: the norm
itself (its class a subclass of the norm's, its state dict exactly the norm's, so weights move to and from
timm's own models) with two children, ``drop`` and ``act``, applied after it:
``y = act(drop(norm(x)))``.

The activation is timm's own, built by ``timm.layers.create_act_layer`` with ``act_kwargs`` (``inplace``
defaulting to ``inplace``), exactly as ``BatchNormAct2d`` builds it; ``apply_act=False`` gives an identity.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

__all__ = ["NormAct", "create_activation", "norm_act_class", "with_activation"]


class NormAct:
    """Mixin: the norm it is mixed into, then ``drop``, then ``act`` (timm's ``BatchNormAct2d`` order)."""

    drop: nn.Module
    act: nn.Module
    _norm_class: type[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.act(self.drop(super().forward(*args, **kwargs)))  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the class is made at run time: pickle it as "norm_act_class(the norm's class)"
        reduced = super().__reduce_ex__(protocol)
        return (_new_norm_act, (self._norm_class,), *reduced[2:])


@functools.cache
def norm_act_class(norm_class: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``norm_class`` that applies ``drop`` and ``act`` after the norm (one per class)."""
    if issubclass(norm_class, NormAct):
        return norm_class
    name = f"{norm_class.__name__}Act"
    return type(name, (NormAct, norm_class), {"__module__": __name__, "__qualname__": name, "_norm_class": norm_class})


def _new_norm_act(norm_class: type[nn.Module]) -> nn.Module:
    return object.__new__(norm_act_class(norm_class))


def with_activation(norm: nn.Module, act: nn.Module | None = None, drop: nn.Module | None = None) -> nn.Module:
    """``norm`` itself, made to apply ``drop`` then ``act`` after normalizing (None: an identity).

    The object keeps its parameters, buffers and state-dict keys; its class becomes :func:`norm_act_class` of
    its own (still an instance of it), as ``torch.nn.utils.parametrize`` does for parametrized modules.
    """
    norm.__class__ = norm_act_class(type(norm))
    norm.drop = drop if drop is not None else nn.Identity()
    norm.act = act if act is not None else nn.Identity()
    return norm


def activation_of(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(drop, act)`` of a norm + activation layer (bnzoo's or timm's ``BatchNormAct2d``), else None."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return drop, act
    return None


def create_activation(
    act_layer: Any, *, apply_act: bool = True, act_kwargs: dict[str, Any] | None = None, inplace: bool = True
) -> nn.Module:
    """timm's activation for a norm + activation layer: what ``BatchNormAct2d`` makes from the same arguments.

    ``create_act_layer(act_layer, **act_kwargs)`` with ``inplace`` as the default of ``act_kwargs["inplace"]``;
    an identity when ``apply_act`` is False or ``act_layer`` is None.
    """
    from timm.layers import create_act_layer

    kwargs = dict(act_kwargs or {})  # timm's own helper writes into the caller's dict; this does not
    kwargs.setdefault("inplace", inplace)
    act = create_act_layer(act_layer, **kwargs) if apply_act else None
    return nn.Identity() if act is None else act
