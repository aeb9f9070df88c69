"""The "noisy BatchNorm" of Santurkar et al. 2018 (Sec. 2.1), registered as the norm kind ``noisy_bn``.

"We train networks with random noise injected after BatchNorm layers ... noise sampled from a non-zero mean and
non-unit variance distribution. We emphasize that this noise distribution changes at each time step." Our
reading: at every training forward, each channel c draws a shift ``mu_c ~ U(-shift, shift)`` and a scale
``sigma_c ~ U(1, scale)``, and the BatchNorm output becomes ``sigma_c * y + mu_c`` -- every unit's distribution gets
a mean and a variance that jump at every step, i.e. severe "internal covariate shift" injected on purpose. At
inference the layer is plain BatchNorm. :func:`bnzoo_lab.registrations.lab_registrations` registers the kind.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnzoo.norms.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["NOISY_BN_DESCRIPTION", "NoisyBatchNorm1d", "NoisyBatchNorm2d", "NoisyBatchNorm3d", "build_noisy_bn"]

NOISY_BN_DESCRIPTION = "BatchNorm + per-step random per-channel shift and scale (Santurkar et al. 2018)"


class _NoisyBatchNorm:
    """BatchNorm whose training output is rescaled and shifted per channel by fresh random factors each step."""

    num_features: int
    training: bool

    def __init__(self, num_features: int, *, shift: float = 0.5, scale: float = 1.5, **bn: Any) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift < 0:
            raise ValueError(f"shift must be a number >= 0 (the half-width of U(-shift, shift)), got {shift!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 1:
            raise ValueError(f"scale must be a number >= 1 (the upper end of U(1, scale)), got {scale!r}")
        super().__init__(num_features, **bn)  # type: ignore[call-arg]
        self.shift, self.scale = float(shift), float(scale)

    def forward(self, input: Tensor) -> Tensor:
        y = super().forward(input)  # type: ignore[misc]
        if not self.training:
            return y
        shape = (1, self.num_features) + (1,) * (y.dim() - 2)
        mu = (torch.rand(self.num_features, device=y.device, dtype=y.dtype) * 2 - 1) * self.shift
        sigma = 1 + torch.rand(self.num_features, device=y.device, dtype=y.dtype) * (self.scale - 1)
        return torch.addcmul(mu.view(shape), y, sigma.view(shape))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.shift}, scale={self.scale}"  # type: ignore[misc]


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    """Noisy BatchNorm for (N, C) or (N, C, L) inputs."""


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    """Noisy BatchNorm for (N, C, H, W) inputs."""


class NoisyBatchNorm3d(_NoisyBatchNorm, BatchNorm3d):
    """Noisy BatchNorm for (N, C, D, H, W) inputs."""


_CLASSES = {"1d": NoisyBatchNorm1d, "2d": NoisyBatchNorm2d, "3d": NoisyBatchNorm3d}


def build_noisy_bn(
    num_features: int, layout: str, *, shift: float = 0.5, scale: float = 1.5, eps: float = 1e-5, momentum: float = 0.1
) -> torch.nn.Module:
    if layout not in _CLASSES:
        raise ValueError(f"noisy_bn supports the layouts {', '.join(_CLASSES)}, got {layout!r}")
    return _CLASSES[layout](num_features, shift=shift, scale=scale, eps=eps, momentum=momentum)
