"""A timm-style model registry: ``register_model``, ``create_model``, ``list_models``.

Every entry point is a function taking keyword arguments only -- at least ``norm`` (a kind of
:mod:`bnzoo.norms`), ``num_classes`` and ``in_chans`` -- and returning an ``nn.Module``. Its keyword arguments
are the model's options: :func:`create_model` rejects any other with the list of valid ones, and an unknown
model name fails with the closest registered names.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["check_model_options", "create_model", "is_model", "list_models", "model_options", "register_model"]

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFn | None = None, *, name: str | None = None) -> Any:
    """Register a model entry point under its function name (or ``name``). Use as ``@register_model`` or
    ``@register_model(name="my_net")``."""

    def decorate(f: ModelFn) -> ModelFn:
        key = name or f.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = f
        return f

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern`` (e.g. ``"resnet*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def _entry_point(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}. See bnzoo.list_models() for all {len(_MODELS)} models")
    return _MODELS[name]


def model_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults."""
    sig = inspect.signature(_entry_point(name))
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def create_model(name: str, *, pretrained: bool | str = False, **options: Any) -> nn.Module:
    """Build the registered model ``name``: ``create_model("resnet20", norm="renorm", num_classes=10)``.

    ``pretrained``: ``True`` loads the zoo's checkpoint of this architecture and norm, a string the checkpoint
    of that name, path or URL (:func:`bnzoo.hub.pretrained_model`: verified, loaded with ``weights_only=True``,
    refused when it holds another architecture or norm); options not given are then the checkpoint's.
    """
    check_model_options(name, options)
    if pretrained is not False:
        from ..hub import pretrained_model  # the hub builds its networks with this function: imported when used

        return pretrained_model(name, pretrained, options)
    return _entry_point(name)(**options)


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Raise a ValueError for an unknown model ``name`` or option, naming it and the valid ones."""
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
