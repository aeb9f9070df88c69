"""bnzoo: a PyTorch Lightning plugin and model zoo for normalization in deep networks.

``import bnzoo`` loads the norms, the models and the zoo (torch and timm; no Lightning). :func:`load_pretrained`,
which returns a LightningModule, imports the Lightning layer on first use.
"""

from typing import Any

from .models import list_models, model_options, register_model
from .norms import (
    NormFactory,
    convert_norms,
    list_norms,
    make_norm,
    norm_factory,
    norm_layer,
    register_norm,
    revert_norms,
)
from .zoo import create_model, list_pretrained

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":
        from .tasks import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'bnzoo' has no attribute {name!r}")


__all__ = [
    "NormFactory",
    "__version__",
    "convert_norms",
    "create_model",
    "list_models",
    "list_norms",
    "list_pretrained",
    "load_pretrained",
    "make_norm",
    "model_options",
    "norm_factory",
    "norm_layer",
    "register_model",
    "register_norm",
    "revert_norms",
]
