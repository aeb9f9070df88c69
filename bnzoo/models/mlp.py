"""The fully connected network of the original BN experiment on MNIST (Ioffe & Szegedy 2015, Sec. 4.1).

"3 fully-connected hidden layers with 100 activations each ... each hidden layer computes y = g(Wu + b) with
sigmoid nonlinearity, and the weights W initialized to small random Gaussian values"; the BN network adds
a norm to each hidden layer, before the nonlinearity (``norm_position="before"``, the paper's Sec. 3.2
choice) or after it (``"after"``, for claim C7).

Each hidden layer is an :class:`MLPBlock` with children ``linear``, ``norm``, ``act`` and ``dropout``, so the
input of a nonlinearity is reachable with a forward hook, e.g. the last hidden layer's sigmoid inputs
(Fig. 1(b, c) of the paper, claim C1)::

    model = create_model("mlp", norm="bn", in_chans=1, image_size=28)
    model.blocks[-1].act.register_forward_hook(lambda module, inputs, output: record(inputs[0]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..checks import check_choice
from ..norms.factory import NormFactory, norm_factory
from .layers import ACTIVATIONS, check_image_options, init_kaiming_, make_activation, norm_has_bias
from .registry import register_model

__all__ = ["MLP", "NORM_POSITIONS", "MLPBlock"]

NORM_POSITIONS: tuple[str, ...] = ("before", "after")


class MLPBlock(nn.Module):
    """A hidden layer: ``act(norm(linear(x)))`` ("before") or ``norm(act(linear(x)))`` ("after"); dropout.

    The linear layer has a bias unless a norm with its own bias directly follows it (position "before").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        norm_layer: NormFactory,
        norm_position: str = "before",
        activation: str = "sigmoid",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm_position = check_choice("norm_position", norm_position, NORM_POSITIONS)
        normalization = norm_layer(out_features, "1d")
        bias = norm_position == "after" or not norm_has_bias(normalization)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.norm = normalization
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        x = self.act(self.norm(x)) if self.norm_position == "before" else self.norm(self.act(x))
        return self.dropout(x)


class MLP(nn.Module):
    """Flatten, hidden :class:`MLPBlock` layers (``blocks``), a linear classifier (``head``).

    Initialization (for the init-sensitivity sweep of claim C5): every weight ``W ~ N(0, std^2)`` with
    ``std = init_scale * gain / sqrt(fan_in)``, ``gain = torch.nn.init.calculate_gain(activation)`` for the
    hidden layers (1 for sigmoid, 5/3 for tanh, sqrt(2) for relu) and 1 for the classifier; biases are zero.
    ``init_scale=1`` is thus LeCun's init for sigmoid and He et al.'s (2015, Eq. 10) for ReLU.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: Sequence[int] = (100, 100, 100),
        *,
        norm: str | NormFactory = "bn",
        norm_options: dict[str, Any] | None = None,
        norm_position: str = "before",
        activation: str = "sigmoid",
        dropout: float = 0.0,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        norm_layer = norm_factory(norm, norm_options)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("norm_position", norm_position, NORM_POSITIONS)
        _check_options(hidden, dropout, init_scale)
        widths = [in_features, *hidden]
        self.flatten = nn.Flatten()
        self.in_features = in_features
        self.blocks = nn.ModuleList(
            MLPBlock(
                fan_in,
                fan_out,
                norm_layer=norm_layer,
                norm_position=norm_position,
                activation=activation,
                dropout=dropout,
            )
            for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=False)
        )
        self.head = nn.Linear(widths[-1], num_classes)
        for block in self.blocks:
            init_kaiming_(block.linear, activation, init_scale)
        init_kaiming_(self.head, "linear", init_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects inputs of {self.in_features} features (in_chans * image_size**2), "
                f"got {x.shape[1]} from an input of shape {tuple(x.shape)}"
            )
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _check_options(hidden: Any, dropout: Any, init_scale: Any) -> None:
    if (
        isinstance(hidden, (str, bytes))
        or not isinstance(hidden, Sequence)
        or not hidden
        or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)
    ):
        raise ValueError(f"hidden must be a non-empty list of positive ints (layer widths), got {hidden!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
        raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")


@register_model
def mlp(
    *,
    norm: str = "bn",
    norm_options: dict | None = None,
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 32,
    hidden: Sequence[int] = (100, 100, 100),
    activation: str = "sigmoid",
    norm_position: str = "before",
    dropout: float = 0.0,
    init_scale: float = 1.0,
) -> nn.Module:
    """The MNIST network of Ioffe & Szegedy 2015, Sec. 4.1 (three hidden layers of 100 sigmoid units).

    Options:
        norm, norm_options: the norm of each hidden layer ("1d" layout) and its options.
        num_classes: classifier outputs.
        in_chans, image_size: the input is flattened to ``in_chans * image_size**2`` features.
        hidden: widths of the hidden layers.
        activation: "sigmoid" (the paper's), "relu" or "tanh".
        norm_position: "before" the activation (the paper's) or "after" it.
        dropout: dropout probability after each hidden layer.
        init_scale: multiplies the standard deviation of every weight's initialization (see :class:`MLP`).
    """
    check_image_options(num_classes, in_chans, image_size)
    return MLP(
        in_chans * image_size**2,
        num_classes,
        hidden,
        norm=norm,
        norm_options=norm_options,
        norm_position=norm_position,
        activation=activation,
        dropout=dropout,
        init_scale=init_scale,
    )
