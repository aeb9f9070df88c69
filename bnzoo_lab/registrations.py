"""What the claims experiments need beyond bnzoo: the ``noisy_bn`` norm kind (Santurkar et al. 2018), the
``input_norm_mlp`` (claim C13) and ``cifar_resnet`` (any depth; C2/C3) models, registered only while the lab
runs (a registry scope), so a plain ``import bnzoo`` -- or ``import bnzoo_lab`` -- offers exactly bnzoo's own
kinds and models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bnzoo.models.registry import MODELS, register_model
from bnzoo.norms.factory import NORM_KINDS, register_norm

from .models import cifar_resnet, input_norm_mlp
from .norms import NOISY_BN_DESCRIPTION, build_noisy_bn

__all__ = ["lab_registrations"]


@contextmanager
def lab_registrations() -> Iterator[None]:
    """Register the lab's norm kinds and models for the duration of the block (re-entrant: an inner block adds
    nothing new)."""
    with NORM_KINDS.scoped(), MODELS.scoped():
        if "noisy_bn" not in NORM_KINDS:
            register_norm("noisy_bn", NOISY_BN_DESCRIPTION)(build_noisy_bn)
        if "input_norm_mlp" not in MODELS:
            register_model(input_norm_mlp)
        if "cifar_resnet" not in MODELS:
            register_model(cifar_resnet)
        yield
