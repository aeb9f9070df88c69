"""bnzoo: a PyTorch Lightning plugin and model zoo for normalization in deep networks."""

from .models import create_model, list_models, register_model
from .norms import list_norms, make_norm, register_norm

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "list_norms", "make_norm", "register_model", "register_norm"]
