"""Frozen batch normalization: fixed statistics and affine transform, for fine-tuning.

The layer computes ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias`` (Ioffe & Szegedy 2015,
Alg. 2, inference) with every tensor a buffer: nothing is learned and nothing is updated, in training mode too.
Its state dict has BatchNorm's keys (``num_batches_tracked`` is accepted and ignored), so trained BatchNorm or
Batch Renorm weights load into it directly; :func:`bnzoo.norms.convert.freeze_norms` converts a whole model, as
detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import check_channels, check_norm_args

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics and affine parameters, for any (N, C, *) input."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        check_norm_args(num_features, eps, None)
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, input: Tensor) -> Tensor:
        check_channels(self, input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> FrozenBatchNorm:
        """A frozen copy of a BatchNorm-like layer's running statistics and affine parameters, on the layer's
        device and in its dtype. A layer without running statistics (``track_running_stats=False``) normalizes
        with batch statistics in inference too: it has nothing to freeze, and is refused."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__}({bn.num_features}): it has no running statistics "
                "(track_running_stats=False), so inference uses each batch's own statistics"
            )
        frozen = cls(bn.num_features, bn.eps, device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen
