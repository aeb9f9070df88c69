"""Per-sample normalization over the channels of (N, C, *) inputs: layer norm and group norm.

Layer normalization (Ba et al. 2016): for (N, C) this is ``nn.LayerNorm(C)``; for feature maps each spatial
position is normalized over its C channels, as timm's ``LayerNorm2d`` (ConvNeXt) does. Group normalization
(Wu & He 2018, Eq. 1 with the sets of Eq. 7): statistics over each group of C/G channels and all positions.
Neither uses batch statistics, so both behave the same in training and inference. State dicts have
``nn.LayerNorm``'s and ``nn.GroupNorm``'s keys.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import check_channels, check_norm_args

__all__ = ["ChannelGroupNorm", "ChannelLayerNorm", "default_num_groups"]


class ChannelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over dimension 1 of an (N, C, *) input."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        check_norm_args(num_features, eps, None)
        super().__init__(num_features, eps=eps, elementwise_affine=affine)
        self.num_features = num_features

    def forward(self, input: Tensor) -> Tensor:
        check_channels(self, input)
        if input.dim() == 2:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        moved = input.movedim(1, -1)
        return F.layer_norm(moved, self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


def default_num_groups(num_features: int, max_groups: int = 32) -> int:
    """Groups for GroupNorm when none are given: Wu & He's 32, capped so that each group has >= 2 channels.

    The largest divisor of ``num_features`` that is at most ``min(max_groups, num_features // 2)``; 1 (layer
    norm over all channels) for a single channel. E.g. 16 -> 8, 64 -> 32, 96 -> 32, 100 -> 25, 3 -> 1.
    """
    limit = max(1, min(max_groups, num_features // 2))
    return max(g for g in range(1, limit + 1) if num_features % g == 0)


class ChannelGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a ``num_features`` attribute and construction-time checks."""

    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5, affine: bool = True) -> None:
        check_norm_args(num_features, eps, None)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if num_features % num_groups:
            divisors = [g for g in range(1, num_features + 1) if num_features % g == 0]
            raise ValueError(f"num_groups={num_groups} does not divide num_features={num_features}; valid: {divisors}")
        super().__init__(num_groups, num_features, eps=eps, affine=affine)
        self.num_features = num_features
