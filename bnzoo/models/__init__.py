"""bnzoo's model zoo: every architecture takes ``norm: str`` and asks :func:`bnzoo.norms.make_norm` for its
norm layers. Importing this package registers every family."""

from . import inception, mlp, resnet, rnn  # noqa: F401  (registers the entry points)
from .registry import create_model, is_model, list_models, model_options, register_model

BUILTIN_MODELS: tuple[str, ...] = tuple(list_models())
"""The architectures bnzoo ships; :func:`list_models` also lists those registered later (by users, or by
:mod:`bnzoo.experiments`)."""

__all__ = ["BUILTIN_MODELS", "create_model", "is_model", "list_models", "model_options", "register_model"]
