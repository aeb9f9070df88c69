"""A timm-style model registry: ``register_model``, ``build_model``, ``list_models``.

Every entry point is a function taking keyword arguments only -- at least ``norm`` (a kind of
:mod:`bnzoo.norms`), ``num_classes`` and ``in_chans`` -- and returning an ``nn.Module``. Its keyword arguments
are the model's options: :func:`build_model` rejects any other with the list of valid ones, and an unknown
model name fails with the closest registered names. ``timm/<name>`` names any timm model (built by
:mod:`bnzoo.models.timm_models` with the norm kind applied); :func:`list_models` lists bnzoo's own only. This
module imports nothing of bnzoo above the norms:
loading pretrained weights (``bnzoo.create_model(..., pretrained=...)``) is :mod:`bnzoo.zoo.networks`'s job.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..registry import Registry, check_options
from .timm_models import is_timm_name, timm_entry

__all__ = [
    "MODELS",
    "build_model",
    "check_model_options",
    "entry_point",
    "list_models",
    "model_options",
    "register_model",
]

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(fn: ModelFn | None = None, *, name: str | None = None) -> Any:
    """Register a model entry point under its function name (or ``name``). Use as ``@register_model`` or
    ``@register_model(name="my_net")``."""

    def decorate(f: ModelFn) -> ModelFn:
        MODELS.register(name or f.__name__, f)
        return f

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern`` (e.g. ``"resnet*"``), sorted."""
    return MODELS.names(pattern)


def entry_point(name: str) -> Callable[..., nn.Module]:
    """The entry point of model ``name``: a registered one, or ``timm/<name>`` (any timm model,
    :mod:`bnzoo.models.timm_models`); an unknown name fails with the closest names."""
    if is_timm_name(name):
        return timm_entry(name)
    return MODELS.get(name)


def model_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults."""
    sig = inspect.signature(entry_point(name))
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Raise a ValueError for an unknown model ``name`` or option, naming it and the valid ones."""
    check_options("model", name, options, list(model_options(name)))


def build_model(name: str, **options: Any) -> nn.Module:
    """Build the registered model ``name`` with random weights: ``build_model("resnet20", norm="renorm")``,
    ``build_model("timm/efficientnet_b0", norm="renorm", num_classes=10)``."""
    check_model_options(name, options)
    return entry_point(name)(**options)
