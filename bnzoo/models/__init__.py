"""bnzoo's architectures: every entry point takes ``norm: str`` (and ``norm_options``), turns them into one
:class:`bnzoo.norms.NormFactory` and passes that down. Importing this package registers every family."""

from . import inception, mlp, resnet, rnn  # noqa: F401  (registers the entry points)
from .registry import MODELS, build_model, check_model_options, list_models, model_options, register_model

BUILTIN_MODELS: tuple[str, ...] = tuple(list_models())
"""The architectures bnzoo ships; :func:`list_models` also lists those registered later (by users, or by
:mod:`bnzoo_lab` inside its registry scope)."""

__all__ = [
    "BUILTIN_MODELS",
    "MODELS",
    "build_model",
    "check_model_options",
    "list_models",
    "model_options",
    "register_model",
]
