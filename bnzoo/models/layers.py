"""Small layers and helpers shared by bnzoo's image models.

* :func:`make_activation` / :data:`ACTIVATIONS`: the nonlinearities a model may be asked for by name.
* :class:`ConvNormAct`: convolution -> norm -> activation, the unit of BN networks (Ioffe & Szegedy 2015,
  Sec. 3.2: the norm goes right before the nonlinearity, and the convolution's bias is dropped when the norm
  adds its own).
* :class:`SkipInit`: a learnable scalar gain on a residual branch, initialized to zero (De & Smith 2020);
  :func:`zero_norm_weight_`: the other way to start a residual branch at zero (Goyal et al. 2017).
* :func:`init_kaiming_`: the He et al. 2015 (Eq. 10) initialization used by the zoo's own models.
* :func:`check_image_options`: the options every image entry point takes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_choice, check_positive_int
from ..norms.factory import NormFactory

__all__ = [
    "ACTIVATIONS",
    "ConvNormAct",
    "SkipInit",
    "check_image_options",
    "init_kaiming_",
    "make_activation",
    "norm_has_bias",
    "zero_norm_weight_",
]

_ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATION_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# Validation


def check_image_options(num_classes: Any, in_chans: Any, image_size: Any) -> None:
    """Validate the options every image entry point takes."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_chans", in_chans)
    check_positive_int("image_size", image_size)


# ----------------------------------------------------------------------------------------------------------
# Activations, initialization


def make_activation(name: str) -> nn.Module:
    """A fresh activation module: ``"relu"``, ``"sigmoid"`` or ``"tanh"``."""
    return _ACTIVATION_CLASSES[check_choice("activation", name, ACTIVATIONS)]()


def init_kaiming_(layer: nn.Module, nonlinearity: str = "relu", scale: float = 1.0) -> None:
    """Initialize a Conv or Linear layer as He et al. 2015 ("Delving deep into rectifiers"), Eq. 10.

    ``weight ~ N(0, std^2)`` with ``std = scale * gain(nonlinearity) / sqrt(fan_in)``, where ``gain`` is
    ``torch.nn.init.calculate_gain`` (sqrt(2) for relu, 1 for sigmoid and for a linear output layer, 5/3 for
    tanh) and ``fan_in = in_channels / groups * kernel area``; the bias, if any, is zero.
    """
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity=nonlinearity)
    if scale != 1.0:
        with torch.no_grad():
            layer.weight.mul_(scale)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


# ----------------------------------------------------------------------------------------------------------
# Layers


def norm_has_bias(norm: nn.Module) -> bool:
    """Whether a norm layer adds its own per-channel shift (``bias``, a parameter or a fixed buffer).

    A layer that feeds such a norm needs no bias of its own (Ioffe & Szegedy 2015, Sec. 3.2: "the bias b can
    be ignored since its effect will be canceled by the subsequent mean subtraction"). Frozen BN counts as
    having one, so the weights of a ``bn`` model load into a ``frozen`` one.
    """
    return isinstance(getattr(norm, "bias", None), Tensor)


def zero_norm_weight_(norm: nn.Module) -> None:
    """Zero a norm layer's learnable weight (gamma), if it has one: a residual branch ending in that norm then
    starts at zero (Goyal et al. 2017, Sec. 5.1). Fixed weights (frozen BN's buffers) are left alone."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, nn.Parameter):
        nn.init.zeros_(weight)


class ConvNormAct(nn.Module):
    """``conv -> norm -> activation`` with "same" padding; the conv has a bias only when the norm has none.

    The norm is ``norm_layer(out_channels, "2d")`` (a :class:`bnzoo.norms.NormFactory`). ``apply_act=False``
    leaves the output linear (the last unit of a residual branch, before the addition); the conv is initialized by
    :func:`init_kaiming_` for ``activation`` either way, as the network's activation follows it eventually.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        norm_layer: NormFactory,
        activation: str = "relu",
        apply_act: bool = True,
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        normalization = norm_layer(out_channels, "2d")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=not norm_has_bias(normalization),
        )
        self.norm = normalization
        self.act = make_activation(activation) if apply_act else nn.Identity()
        init_kaiming_(self.conv, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class SkipInit(nn.Module):
    """A learnable scalar gain ``alpha`` on a residual branch, initialized to 0 (De & Smith 2020, "Batch
    normalization biases residual blocks towards the identity function in deep networks", Sec. 4).

    With ``x + alpha * f(x)`` every residual block is the identity at initialization, which is what BN does
    implicitly by scaling down the residual branches; it lets deep residual networks without normalization
    train.
    """

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain

    def extra_repr(self) -> str:
        return f"gain={self.gain.item():.4g}"
