"""bnzoo: a PyTorch Lightning plugin and model zoo for normalization in deep networks."""

from typing import Any

from .models import create_model, list_models, register_model
from .norms import list_norms, make_norm, register_norm

__version__ = "0.1.0"

#: exported from bnzoo.hub, which is imported on first use (it needs Lightning; ``import bnzoo`` does not)
_HUB_EXPORTS = ("list_pretrained", "load_pretrained")


def __getattr__(name: str) -> Any:
    if name in _HUB_EXPORTS:
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'bnzoo' has no attribute {name!r}")


__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "list_norms",
    "list_pretrained",
    "load_pretrained",
    "make_norm",
    "register_model",
    "register_norm",
]
