"""Inception networks with any bnzoo norm: a compact BN-Inception for small images, and timm's Inception-v3.

``bn_inception_small`` follows BN-Inception (Ioffe & Szegedy 2015, Sec. 4.2 and Appendix, Fig. 5): every
convolution is ``conv -> norm -> nonlinearity`` (the conv without a bias when the norm has one), each
Inception module concatenates four branches -- 1x1; 1x1 reduce then 3x3; 1x1 reduce then two 3x3 (replacing
the 5x5 of GoogLeNet); 3x3 average pooling then a 1x1 projection -- and each reduction module halves the map
with a stride-2 3x3 branch, a stride-2 double-3x3 branch and a stride-2 max pooling passed through. It is
sized for 28x28 and 32x32 images on a CPU (about 0.4M parameters at ``width=1``). ``aux_head`` adds an auxiliary
classifier on the last module before the second reduction (as Inception-v3's sits on the 17x17 grid before its
last reduction), plain or batch-normalized (:class:`AuxiliaryHead`; Szegedy et al. 2016, Table 3).

``timm_inception_v3`` is timm's Inception-v3 (Szegedy et al. 2016) with bnzoo's norm in every ``ConvNormAct``,
those of the auxiliary classifier included, and optionally the BN-auxiliary of Szegedy et al. 2016, Table 3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.models.inception_v3 import InceptionV3 as TimmInceptionV3
from torch import Tensor, nn

from ..checks import check_choice
from ..norms.factory import norm_factory
from .layers import ACTIVATIONS, ConvNormAct, check_image_options, init_kaiming_, norm_has_bias
from .registry import register_model

__all__ = [
    "AUX_HEADS",
    "BN_INCEPTION_SMALL",
    "AuxiliaryHead",
    "BNInceptionSmall",
    "InceptionModule",
    "InceptionV3",
    "ReductionModule",
    "inception_v3_min_image_size",
]

ConvFactory = Callable[..., nn.Module]


class InceptionModule(nn.Module):
    """A BN-Inception module: branches 1x1, 1x1 -> 3x3, 1x1 -> 3x3 -> 3x3, avg-pool 3x3 -> 1x1, concatenated.

    Output channels: ``c1x1 + c3x3 + c3x3dbl + pool_proj``.
    """

    def __init__(
        self,
        in_channels: int,
        c1x1: int,
        c3x3_reduce: int,
        c3x3: int,
        c3x3dbl_reduce: int,
        c3x3dbl: int,
        pool_proj: int,
        conv: ConvFactory,
    ) -> None:
        super().__init__()
        self.branch1x1 = conv(in_channels, c1x1, 1)
        self.branch3x3 = nn.Sequential(conv(in_channels, c3x3_reduce, 1), conv(c3x3_reduce, c3x3, 3))
        self.branch3x3dbl = nn.Sequential(
            conv(in_channels, c3x3dbl_reduce, 1), conv(c3x3dbl_reduce, c3x3dbl, 3), conv(c3x3dbl, c3x3dbl, 3)
        )
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), conv(in_channels, pool_proj, 1)
        )
        self.out_channels = c1x1 + c3x3 + c3x3dbl + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch3x3dbl, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


class ReductionModule(nn.Module):
    """A BN-Inception reduction module (stride 2): 1x1 -> 3x3/2, 1x1 -> 3x3 -> 3x3/2, max-pool 3x3/2 passed
    through. Output channels: ``c3x3 + c3x3dbl + in_channels``; maps of size s become ceil(s / 2)."""

    def __init__(
        self,
        in_channels: int,
        c3x3_reduce: int,
        c3x3: int,
        c3x3dbl_reduce: int,
        c3x3dbl: int,
        conv: ConvFactory,
    ) -> None:
        super().__init__()
        self.branch3x3 = nn.Sequential(conv(in_channels, c3x3_reduce, 1), conv(c3x3_reduce, c3x3, 3, 2))
        self.branch3x3dbl = nn.Sequential(
            conv(in_channels, c3x3dbl_reduce, 1),
            conv(c3x3dbl_reduce, c3x3dbl, 3),
            conv(c3x3dbl, c3x3dbl, 3, 2),
        )
        self.branch_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = c3x3 + c3x3dbl + in_channels

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), self.branch_pool(x)], dim=1)


# The layout of bn_inception_small at width 1: the stem's channels, then each module as
# ("inception", (c1x1, c3x3_reduce, c3x3, c3x3dbl_reduce, c3x3dbl, pool_proj)) or
# ("reduction", (c3x3_reduce, c3x3, c3x3dbl_reduce, c3x3dbl)). Maps: s, s/2 after the first reduction, s/4.
BN_INCEPTION_SMALL: dict[str, Any] = {
    "stem": 32,
    "modules": (
        ("inception", (16, 16, 24, 8, 12, 12)),  # 32 -> 64 channels
        ("reduction", (32, 40, 16, 24)),  # -> 128
        ("inception", (32, 32, 48, 16, 24, 24)),  # -> 128
        ("inception", (32, 32, 48, 16, 24, 24)),  # -> 128
        ("reduction", (48, 64, 24, 32)),  # -> 224
        ("inception", (64, 48, 96, 24, 48, 48)),  # -> 256
        ("inception", (64, 48, 96, 24, 48, 48)),  # -> 256
    ),
}

_MODULES: dict[str, type[nn.Module]] = {"inception": InceptionModule, "reduction": ReductionModule}

#: ``aux_head`` choices of ``bn_inception_small``: no auxiliary classifier, a plain one, a batch-normalized one
AUX_HEADS: tuple[str, ...] = ("none", "plain", "bn")

#: the auxiliary head at width 1: channels of its 1x1 convolution, units of its hidden fully connected layer
#: (GoogLeNet's are 128 and 1024 on 512-channel 14x14 maps, Szegedy et al. 2015, Sec. 5; scaled to this network)
AUX_HEAD_SIZES: dict[str, int] = {"conv": 32, "fc": 256}


class AuxiliaryHead(nn.Module):
    """An auxiliary classifier (Szegedy et al. 2015, Sec. 5; Szegedy et al. 2016, Sec. 4 and Table 3).

    GoogLeNet's layout: average pooling to 4x4 (GoogLeNet's 5x5/3 pooling of its 14x14 maps gives 4x4), a 1x1
    ``conv -> norm -> ReLU`` unit (``conv``: the network's own, so normalized whenever the network is, as in
    Inception-v3), a hidden fully connected layer with ReLU, and a linear classifier. ``batch_norm=True`` is
    the *BN-auxiliary* of Szegedy et al. 2016, Table 3: "the fully connected layer of the auxiliary classifier
    is also batch-normalized, not just the convolutions" -- ``Linear -> norm -> ReLU`` with ``fc_norm`` (the
    Linear without a bias when the norm has one).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv: ConvFactory,
        conv_channels: int,
        hidden: int,
        fc_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = conv(in_channels, conv_channels, 1)
        fc = nn.Linear(conv_channels * 16, hidden, bias=fc_norm is None or not norm_has_bias(fc_norm))
        init_kaiming_(fc, "relu")
        self.fc = nn.Sequential(fc, *([fc_norm] if fc_norm is not None else []), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)
        init_kaiming_(self.classifier, "linear")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.fc(self.conv(self.pool(x)).flatten(1)))


class BNInceptionSmall(nn.Module):
    """A compact BN-Inception: a 3x3 conv stem, the modules of :data:`BN_INCEPTION_SMALL`, global average
    pooling and a linear classifier.

    Every channel count is multiplied by ``width`` (rounded, at least 1). Convolutions are initialized as He
    et al. 2015b, Eq. 10 (Kaiming normal, fan-in, gain of ``activation``), the classifier with gain 1.

    With ``aux_head`` ``"plain"`` or ``"bn"`` an :class:`AuxiliaryHead` reads the output of the last module before
    the second reduction; ``forward`` then returns ``(logits, aux_logits)`` in training mode and the logits alone
    in eval mode (the head is not run), as torchvision's Inception-v3 does. The task adds the auxiliary loss
    (:meth:`bnzoo.tasks.ClassificationTask.loss`, ``aux_loss_weight``).
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        width: float = 1.0,
        activation: str = "relu",
        aux_head: str = "none",
    ) -> None:
        super().__init__()
        check_image_options(num_classes, in_chans, 1)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("aux_head", aux_head, AUX_HEADS)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"width must be a positive float (a channel multiplier), got {width!r}")
        norm_layer = norm_factory(norm, norm_options)
        if aux_head == "bn" and norm_layer.is_identity:
            raise ValueError(
                "aux_head='bn' batch-normalizes the auxiliary classifier with the network's norm, got norm='none'; "
                "use aux_head='plain' or a norm kind"
            )
        conv = functools.partial(ConvNormAct, norm_layer=norm_layer, activation=activation)

        def scaled(channels: Sequence[int]) -> list[int]:
            return [max(1, round(c * width)) for c in channels]

        stem_channels = scaled([BN_INCEPTION_SMALL["stem"]])[0]
        self.stem = conv(in_chans, stem_channels, 3)
        modules, channels = [], stem_channels
        for kind, sizes in BN_INCEPTION_SMALL["modules"]:
            module = _MODULES[kind](channels, *scaled(sizes), conv=conv)
            modules.append(module)
            channels = module.out_channels
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_kaiming_(self.fc, "linear")
        layout = BN_INCEPTION_SMALL["modules"]
        self.aux_after = max(i for i, (kind, _) in enumerate(layout) if kind == "reduction") - 1  # before the last
        self.aux_head: AuxiliaryHead | None = None
        if aux_head != "none":
            hidden = scaled([AUX_HEAD_SIZES["fc"]])[0]
            self.aux_head = AuxiliaryHead(
                modules[self.aux_after].out_channels, num_classes, conv, scaled([AUX_HEAD_SIZES["conv"]])[0], hidden,
                norm_layer(hidden, "1d") if aux_head == "bn" else None,
            )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.stem(x)
        if self.aux_head is None or not self.training:
            return self.fc(self.pool(self.features(x)).flatten(1))
        x = self.features[: self.aux_after + 1](x)
        aux = self.aux_head(x)
        return self.fc(self.pool(self.features[self.aux_after + 1 :](x)).flatten(1)), aux


@register_model
def bn_inception_small(
    *,
    norm: str = "bn",
    norm_options: dict | None = None,
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 32,
    width: float = 1.0,
    activation: str = "relu",
    aux_head: str = "none",
) -> nn.Module:
    """A compact BN-Inception for 28x28 / 32x32 images (Ioffe & Szegedy 2015, Sec. 4.2); see the module docs.

    Options:
        norm, norm_options: the norm kind of every ``conv -> norm -> activation`` unit and its options.
        num_classes, in_chans: classifier outputs and input channels.
        image_size: accepted for a uniform interface; any size >= 1 works (global average pooling).
        width: channel multiplier (0.4M parameters at 1.0, about width^2 times that otherwise).
        activation: "relu" (the paper's), "sigmoid" (BN-x5-Sigmoid, claim C4) or "tanh".
        aux_head: "none", "plain" (an auxiliary classifier whose convolution is normalized as the network's) or
            "bn" (BN-auxiliary: its fully connected layer normalized too; Szegedy et al. 2016, Table 3); with an
            auxiliary head the model returns ``(logits, aux_logits)`` in training mode, the logits in eval mode.
    """
    check_image_options(num_classes, in_chans, image_size)
    return BNInceptionSmall(
        norm=norm,
        norm_options=norm_options,
        num_classes=num_classes,
        in_chans=in_chans,
        width=width,
        activation=activation,
        aux_head=aux_head,
    )


# ----------------------------------------------------------------------------------------------------------
# timm's Inception-v3


def inception_v3_min_image_size(aux_logits: bool) -> int:
    """The smallest square input Inception-v3 accepts: 75 (the last stage's maps are then 1x1), or 299 with
    the auxiliary classifier, whose 5x5/3 average pooling and 5x5 convolution need the 17x17 maps of Mixed_6e.

    Walks the stem and the reductions of timm's ``InceptionV3.forward_preaux`` / ``forward_postaux``
    backwards: valid 3x3 convs (size - 2), stride-2 valid 3x3 convs and max-pools ((size - 3) // 2 + 1).
    """

    def before_stride2(size: int) -> int:  # the smallest s with (s - 3) // 2 + 1 >= size
        return 2 * size + 1

    # Mixed_7a (stride 2) must output >= 1 pixel; the auxiliary head needs Mixed_6e's maps >= 17.
    size = 17 if aux_logits else before_stride2(1)  # Mixed_6e / Mixed_6a output
    size = before_stride2(size)  # Mixed_6a input = Pool2 output
    size = before_stride2(size)  # Pool2 input = Conv2d_4a_3x3 output
    size += 2  # Conv2d_4a_3x3 (valid 3x3); Conv2d_3b_1x1 keeps the size
    size = before_stride2(size)  # Pool1
    size += 2  # Conv2d_2a_3x3 (valid 3x3); Conv2d_2b_3x3 is padded
    return before_stride2(size)  # Conv2d_1a_3x3 (stride 2)


class InceptionV3(TimmInceptionV3):
    """timm's Inception-v3 whose ``forward`` returns ``(logits, aux_logits)`` only in training mode with
    ``aux_logits=True`` (as torchvision's), and the logits alone otherwise (timm's returns the pair in eval
    mode too, computing the auxiliary head for nothing)."""

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.aux_logits and self.training:
            return super().forward(x)
        return self.forward_head(self.forward_postaux(self.forward_preaux(x)))


@register_model
def timm_inception_v3(
    *,
    norm: str = "bn",
    norm_options: dict | None = None,
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 299,
    aux_logits: bool = False,
    bn_aux: bool = False,
) -> nn.Module:
    """timm's Inception-v3 (Szegedy et al. 2016) with bnzoo's norm in every conv unit, aux head included.

    Options:
        norm, norm_options: the norm of every ``conv -> norm -> ReLU`` unit (timm's ``ConvNormAct``); timm's
            ``eps=1e-3`` reaches the kinds that take an ``eps`` unless ``norm_options`` sets one.
        num_classes, in_chans: classifier outputs and input channels.
        image_size: the input size; at least 75, or 299 with ``aux_logits`` (see
            :func:`inception_v3_min_image_size`). Checked here, so a too small size fails at construction.
        aux_logits: add the auxiliary classifier on Mixed_6e. In training mode the model then returns
            ``(logits, aux_logits)``; in eval mode the logits only.
        bn_aux: BN-auxiliary (Szegedy et al. 2016, Table 3: "the fully connected layer of the auxiliary
            classifier is also batch-normalized"). In timm's head the 5x5 conv that acts as its hidden
            fully connected layer is already a conv -> norm -> ReLU unit, so the remaining fully connected
            layer, the auxiliary classifier ``AuxLogits.fc``, becomes ``Sequential(Linear,
            make_norm(norm, num_classes, "1d"))`` (the Linear without a bias when the norm has one): its
            logits are normalized, with a learned scale and shift. Needs ``aux_logits`` and a norm.

    Initialization is timm's (truncated normal, std 0.1; aux head 0.01 / 0.001) except with ``norm="none"``,
    where it would blow the activations up by about 1e8: there every conv and the classifiers are initialized
    as He et al. 2015b, Eq. 10 (Kaiming normal, fan-in).
    """
    check_image_options(num_classes, in_chans, image_size)
    for option, value in (("aux_logits", aux_logits), ("bn_aux", bn_aux)):
        if not isinstance(value, bool):
            raise ValueError(f"{option} must be True or False, got {value!r}")
    if bn_aux and not aux_logits:
        raise ValueError("bn_aux=True normalizes the auxiliary classifier: it needs aux_logits=True")
    norm_layer = norm_factory(norm, norm_options)
    if bn_aux and norm_layer.is_identity:
        raise ValueError("bn_aux=True needs a norm to put on the auxiliary classifier, got norm='none'")
    min_size = inception_v3_min_image_size(aux_logits)
    if image_size < min_size:
        raise ValueError(
            f"Inception-v3 needs images of at least {min_size}x{min_size}"
            f"{' with aux_logits=True' if aux_logits else ''}, got image_size={image_size}; "
            "resize the inputs or use bn_inception_small for small images"
        )
    model = InceptionV3(
        num_classes=num_classes,
        in_chans=in_chans,
        aux_logits=aux_logits,
        norm_layer=norm_layer.timm_layer(),
    )
    if norm_layer.is_identity:
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                init_kaiming_(layer, "relu")
        init_kaiming_(model.fc, "linear")
        if aux_logits:
            init_kaiming_(model.AuxLogits.fc, "linear")
    if bn_aux:
        aux_norm = norm_layer(num_classes, "1d")
        fc = nn.Linear(model.AuxLogits.fc.in_features, num_classes, bias=not norm_has_bias(aux_norm))
        init_kaiming_(fc, "linear")
        model.AuxLogits.fc = nn.Sequential(fc, aux_norm)
    return model
