"""The networks of the zoo: ``bnzoo.create_model(name, pretrained=...)`` -- a registered architecture, with the
weights of a verified checkpoint when asked (:mod:`bnzoo.zoo.checkpoint`), refused when the checkpoint holds
another network (:mod:`bnzoo.zoo.compatibility`)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..models.registry import build_model, check_model_options, model_options
from .checkpoint import check_compatible, load_checkpoint, load_network_state
from .compatibility import NOT_IDENTITY, describe, plain
from .index import read_index

__all__ = ["create_model", "default_pretrained", "pretrained_model"]


def create_model(name: str, *, pretrained: bool | str | os.PathLike[str] = False, **options: Any) -> nn.Module:
    """Build the registered model ``name``: ``create_model("resnet20", norm="renorm", num_classes=10)``.

    ``pretrained``: ``True`` loads the zoo's checkpoint of this architecture and norm, a string the checkpoint
    of that name, path or URL (:func:`pretrained_model`: verified, loaded with ``weights_only=True``, refused when
    it holds another architecture or norm); options not given are then the checkpoint's.
    """
    check_model_options(name, options)
    if pretrained is not False:
        return pretrained_model(name, pretrained, options)
    return build_model(name, **options)


def default_pretrained(model: str, options: dict[str, Any]) -> str:
    """The registered checkpoint of ``model`` that ``create_model(model, pretrained=True, **options)`` loads: the
    first in the index with that architecture, the norm asked for (else the model's default norm), and every
    other option given equal to its own."""
    norm = options.get("norm", model_options(model).get("norm"))
    wanted = {**options, "norm": norm}
    same_model = [e for e in read_index() if e["model"] == model]
    for entry in same_model:
        stored = entry["create_options"]
        if all(plain(stored[k]) == plain(v) for k, v in wanted.items() if k in stored and k not in NOT_IDENTITY):
            return entry["name"]
    available = ", ".join(f"{e['name']} (norm {e['norm']!r})" for e in same_model) or "none"
    raise ValueError(
        f"no pretrained checkpoint of {describe(model, wanted)}; pretrained checkpoints of {model}: {available}. "
        "Pass pretrained='<name>' (bnzoo.list_pretrained()) or a path/URL"
    )


def pretrained_model(model: str, pretrained: bool | str | os.PathLike[str], options: dict[str, Any]) -> nn.Module:
    """What ``create_model(model, pretrained=..., **options)`` returns: the network with a checkpoint's weights.

    ``pretrained=True`` takes :func:`default_pretrained`; a string is a registered name, a path or a URL.
    Options not given are the checkpoint's (its ``in_chans``, ``num_classes``, model options...); an option given
    that disagrees with the checkpoint, or another architecture, is an :class:`IncompatibleCheckpointError`
    naming both."""
    if pretrained is True:
        source: str | os.PathLike[str] = default_pretrained(model, options)
    elif isinstance(pretrained, (str, os.PathLike)):
        source = pretrained
    else:
        raise TypeError(f"pretrained must be True, False, or a checkpoint name, path or URL; got {pretrained!r}")
    checkpoint = load_checkpoint(source)
    check_compatible(checkpoint, model, options)
    network = build_model(model, **{**checkpoint.network_options, **options})
    load_network_state(network, checkpoint, describe(model, options))
    return network
