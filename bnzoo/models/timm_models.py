"""Any timm model by name with any bnzoo norm: the model entry ``timm/<name>`` (``model: timm/resnet18`` in a
config, ``--model.init_args.model timm/efficientnet_b0`` on the command line, ``bnzoo.create_model(
"timm/regnetx_002", norm="renorm")``).

The network is timm's own (``timm.create_model(name, num_classes=..., in_chans=..., **timm_options)``); bnzoo
applies the norm kind

* through timm's ``norm_layer`` argument (:func:`bnzoo.norms.norm_layer`: timm's norm + activation layers keep
  their activations) where the model's constructor takes one and the model has BatchNorm-like layers, and
* by :func:`bnzoo.norms.convert_norms` for every BatchNorm-like layer that is still not of the kind (a
  constructor without ``norm_layer``, layers a model builds with ``nn.BatchNorm2d`` itself) and for pretrained
  weights (loaded into timm's own layers, then converted: the running statistics are kept).

A model without BatchNorm-like layers (ConvNeXt, ViT: LayerNorm) is built with its own norms, and
:func:`~bnzoo.norms.convert_norms` says so in a warning. ``timm_pretrained=True`` uses timm's weights only where
they are in the local Hugging Face cache (``huggingface_hub.try_to_load_from_cache``); bnzoo never downloads
them, and says so when they are not there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..io import safe_safetensors_load, safe_torch_load
from ..norms.conversion import convert_norms
from ..norms.factory import LAYOUTS, NormFactory, make_norm, norm_factory
from ..norms.introspect import named_batchnorm_like
from ..registry import closest
from .layers import check_image_options

__all__ = [
    "INITIAL_WEIGHT_OPTIONS",
    "TIMM_PREFIX",
    "is_timm_name",
    "local_pretrained_state",
    "timm_entry",
    "timm_model",
    "without_initial_weights",
]

#: a model name ``timm/<name>`` is timm's model ``<name>``
TIMM_PREFIX = "timm/"

#: timm.create_model arguments that bnzoo sets itself: not in ``timm_options``
_RESERVED = ("num_classes", "in_chans", "pretrained", "norm_layer", "pretrained_cfg", "pretrained_cfg_overlay")

#: model options that only choose a network's *initial* weights: a checkpoint's own weights replace them, so a
#: checkpoint is loaded without them (timm's weights need not be in the loading machine's cache)
INITIAL_WEIGHT_OPTIONS: tuple[str, ...] = ("timm_pretrained",)

#: the files a timm model's Hugging Face repository holds its weights in, in the order looked for
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_timm_name(name: Any) -> bool:
    """Whether ``name`` is a timm model entry (``timm/<name>``)."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def without_initial_weights(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A task's stored ``hparams`` with :data:`INITIAL_WEIGHT_OPTIONS` taken out of its ``model_options`` (what
    every checkpoint load builds the network from: the checkpoint's state dict then sets every weight)."""
    hparams = dict(hparams)
    options = hparams.get("model_options")
    if isinstance(options, Mapping) and any(key in options for key in INITIAL_WEIGHT_OPTIONS):
        hparams["model_options"] = {k: v for k, v in options.items() if k not in INITIAL_WEIGHT_OPTIONS}
    return hparams


def _variant(name: str) -> str:
    variant = name[len(TIMM_PREFIX) :]
    if not timm.is_model(variant):
        raise ValueError(
            f"unknown timm model {variant!r} (model {name!r}){closest(variant, timm.list_models())}; "
            "valid: a name of timm.list_models(), optionally with a pretrained tag (resnet18.a1_in1k)"
        )
    return variant


def local_pretrained_state(variant: str) -> dict[str, torch.Tensor]:
    """The state dict of timm's pretrained ``variant`` from the local Hugging Face cache, loaded safely
    (safetensors, or ``torch.load(weights_only=True)``); a ValueError saying they are not local otherwise."""
    from huggingface_hub import constants, try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(variant)
    repo = getattr(config, "hf_hub_id", None) if config is not None else None
    if not repo:
        raise ValueError(f"timm has no Hugging Face weights for {variant!r}; bnzoo reads pretrained weights only there")
    files = (config.hf_hub_filename,) if config.hf_hub_filename else _WEIGHT_FILES
    for filename in files:
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            if filename.endswith(".safetensors"):
                return safe_safetensors_load(Path(path).read_bytes(), label=path)[1]
            return safe_torch_load(path, "cpu")
    raise ValueError(
        f"the pretrained weights of timm model {variant!r} are not local: none of {', '.join(files)} of {repo!r} is "
        f"in the Hugging Face cache {constants.HF_HUB_CACHE!r}. bnzoo does not download them: fetch them where there "
        f"is internet (huggingface-cli download {repo}) into that cache (or set HF_HUB_CACHE), or use "
        "timm_pretrained=false"
    )


def _has_batchnorm_like(variant: str, kwargs: dict[str, Any]) -> bool:
    """Whether timm's ``variant`` with its own norms has a BatchNorm-like layer (built on the meta device)."""
    try:
        with torch.device("meta"):
            return bool(named_batchnorm_like(timm.create_model(variant, **kwargs)))
    except Exception:  # a model whose construction computes on its tensors: build it for real
        return bool(named_batchnorm_like(timm.create_model(variant, **kwargs)))


def _with_norm_layer(variant: str, factory: NormFactory, kwargs: dict[str, Any]) -> nn.Module | None:
    """timm's ``variant`` built with the kind as its ``norm_layer``; None if its constructor takes none."""
    try:
        return timm.create_model(variant, norm_layer=factory.timm_layer(), **kwargs)
    except TypeError as err:
        if "norm_layer" in str(err):
            return None
        raise


def _kind_types(factory: NormFactory) -> tuple[type[nn.Module], ...]:
    """The classes of the kind's layers (every layout that builds), to tell which layers are of it already."""
    types = set()
    for layout in LAYOUTS:
        try:
            types.add(type(make_norm(factory.kind, 2, layout, **factory.options)))
        except ValueError:  # e.g. ghost batches in the seq layout
            continue
    return tuple(types)


def timm_model(
    variant: str,
    *,
    norm: str = "bn",
    norm_options: dict[str, Any] | None = None,
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 32,
    timm_pretrained: bool = False,
    timm_options: dict[str, Any] | None = None,
) -> nn.Module:
    """timm's ``variant`` with bnzoo's norm ``norm`` (see the module doc for how it is applied).

    Options:
        norm, norm_options: the kind of every BatchNorm-like layer and its options.
        num_classes, in_chans: classifier outputs and input channels (timm's ``create_model`` arguments).
        image_size: accepted for a uniform interface (models with a fixed input size take timm's ``img_size``
            through ``timm_options``).
        timm_pretrained: timm's pretrained weights, from the local Hugging Face cache only (a clear error when
            they are not there); a classifier or stem of another size is adapted by timm, as timm does.
        timm_options: more keyword arguments of ``timm.create_model`` (``drop_path_rate``, ``img_size``, ...).
    """
    check_image_options(num_classes, in_chans, image_size)
    factory = norm_factory(norm, norm_options)
    if not isinstance(timm_pretrained, bool):
        raise ValueError(f"timm_pretrained must be true or false, got {timm_pretrained!r}")
    extra = dict(timm_options or {})
    if reserved := sorted(set(extra) & set(_RESERVED)):
        raise ValueError(
            f"timm_options may not set {', '.join(reserved)}: bnzoo sets them (num_classes, in_chans, norm, "
            "timm_pretrained are the entry's own options)"
        )
    kwargs = {**extra, "num_classes": num_classes, "in_chans": in_chans}
    model = None
    if timm_pretrained:
        state = local_pretrained_state(variant)
        model = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs)
    elif _has_batchnorm_like(variant, kwargs):
        model = _with_norm_layer(variant, factory, kwargs)
    if model is None:
        model = timm.create_model(variant, **kwargs)
        if not named_batchnorm_like(model):
            return convert_norms(model, factory.kind, **factory.options)  # no change; the warning says why
    kind_types = _kind_types(factory)
    left = [name for name, layer in named_batchnorm_like(model).items() if not isinstance(layer, kind_types)]
    return convert_norms(model, factory.kind, include=left, **factory.options) if left else model


@functools.cache
def timm_entry(name: str) -> Callable[..., nn.Module]:
    """The entry point of model ``timm/<variant>``: :func:`timm_model` with ``variant`` bound (an unknown timm
    name is a ValueError with the closest timm names)."""
    variant = _variant(name)

    def entry(**options: Any) -> nn.Module:
        return timm_model(variant, **options)

    signature = inspect.signature(timm_model)
    entry.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"timm's ``{variant}`` with bnzoo's norm layers." + (timm_model.__doc__ or "").split("\n", 1)[1]
    return entry
