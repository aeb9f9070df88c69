"""Residual networks with any bnzoo norm: the CIFAR ResNets of He et al. 2015 and timm's ImageNet ResNets.

CIFAR ResNets (He et al. 2015, "Deep Residual Learning for Image Recognition", Sec. 4.2): a 3x3 conv with 16
channels, then three stages of ``n`` basic blocks (two 3x3 convs each) with 16, 32 and 64 channels on maps of
32, 16 and 8 pixels (28, 14, 7 for 28x28 inputs), global average pooling and a fully connected layer:
``6n + 2`` weighted layers, ResNet-20/32/44/56/110 for n = 3/5/7/9/18 (0.27M/0.46M/0.66M/0.85M/1.7M
parameters). Every shortcut is the identity ("option A"): where a stage halves the map and doubles the
channels, the shortcut subsamples with stride 2 and appends zero channels, so shortcuts have no parameters.

ImageNet ResNets come from timm unchanged (``timm_resnet18/34/50``): bnzoo only plugs in its norm.

Without normalization (``norm="none"``) each residual branch ends in a learnable scalar gain initialized to 0
(SkipInit, De & Smith 2020), so every block starts as the identity, as BN's down-scaling of the residual
branches makes it in effect; ``skip_init`` turns this on or off for any norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch.nn.functional as F
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck as TimmBottleneck
from torch import Tensor, nn

from ..norms.factory import NormFactory, norm_factory
from .layers import ConvNormAct, SkipInit, check_image_options, init_kaiming_, zero_norm_weight_
from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "ShortcutA"]

CIFAR_WIDTHS: tuple[int, int, int] = (16, 32, 64)


def _resolve_skip_init(norm_layer: NormFactory, skip_init: Any, zero_init_residual: Any) -> bool:
    if skip_init is not None and not isinstance(skip_init, bool):
        raise ValueError(f"skip_init must be True, False or None (on exactly when norm='none'), got {skip_init!r}")
    if not isinstance(zero_init_residual, bool):
        raise ValueError(f"zero_init_residual must be True or False, got {zero_init_residual!r}")
    return norm_layer.is_identity if skip_init is None else skip_init


class ShortcutA(nn.Module):
    """The parameter-free identity shortcut of He et al. 2015, option A (Sec. 3.3 and 4.2).

    ``x[:, :, ::stride, ::stride]`` with ``out_channels - in_channels`` zero channels appended after the
    input's channels, as in the authors' Torch implementation (fb.resnet.torch, shortcutType 'A').
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"an option-A shortcut can only add channels, got {in_channels} -> {out_channels} channels"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``relu(gain * norm(conv(relu(norm(conv(x))))) + shortcut(x))`` (He et al. 2015, Fig. 2 left).

    ``gain`` is a :class:`SkipInit` scalar when ``skip_init``, else absent; the shortcut is the identity, or
    :class:`ShortcutA` where the block changes the stride or the width.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        norm_layer: NormFactory,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        unit = {"norm_layer": norm_layer, "activation": "relu"}
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, stride, **unit)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, 1, apply_act=False, **unit)
        self.gain = SkipInit() if skip_init else nn.Identity()
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = ShortcutA(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.gain(self.conv2(self.conv1(x))) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2015, Sec. 4.2, with ``depth = 6n + 2``; see the module docstring.

    Convolutions are initialized as He et al. 2015b, Eq. 10 (Kaiming normal, fan-in, ReLU gain), the
    classifier with gain 1; norms start at weight 1, bias 0. ``zero_init_residual`` zeroes the last norm
    weight of each block (Goyal et al. 2017); it is skipped when ``skip_init`` is on, since the zero gain
    already makes the block the identity and zeroing both would leave neither a gradient.
    """

    def __init__(
        self,
        depth: int = 20,
        *,
        norm: str | NormFactory = "bn",
        norm_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        skip_init: bool | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet's depth must be 6n + 2 with n >= 1 (20, 32, 44, ...), got {depth!r}")
        check_image_options(num_classes, in_chans, 1)
        norm_layer = norm_factory(norm, norm_options)
        use_skip_init = _resolve_skip_init(norm_layer, skip_init, zero_init_residual)
        blocks_per_stage = (depth - 2) // 6
        self.stem = ConvNormAct(in_chans, CIFAR_WIDTHS[0], 3, norm_layer=norm_layer)
        stages, channels = [], CIFAR_WIDTHS[0]
        for index, width in enumerate(CIFAR_WIDTHS):
            blocks = []
            for position in range(blocks_per_stage):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, norm_layer=norm_layer, skip_init=use_skip_init))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_kaiming_(self.fc, "linear")
        if zero_init_residual and not use_skip_init:
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    zero_norm_weight_(block.conv2.norm)

    def forward(self, x: Tensor) -> Tensor:
        features = self.pool(self.stages(self.stem(x)))
        return self.fc(features.flatten(1))


def _cifar_resnet(
    depth: int,
    *,
    norm: str,
    norm_options: dict[str, Any] | None,
    num_classes: int,
    in_chans: int,
    image_size: int,
    skip_init: bool | None,
    zero_init_residual: bool,
) -> nn.Module:
    check_image_options(num_classes, in_chans, image_size)  # any size works: the pooling is global
    return CifarResNet(
        depth,
        norm=norm,
        norm_options=norm_options,
        num_classes=num_classes,
        in_chans=in_chans,
        skip_init=skip_init,
        zero_init_residual=zero_init_residual,
    )


# The attribute of each timm block that holds the last norm of its residual branch.
_TIMM_LAST_NORM: dict[type[nn.Module], str] = {TimmBasicBlock: "bn2", TimmBottleneck: "bn3"}


def _timm_resnet(
    variant: str,
    *,
    norm: str,
    norm_options: dict[str, Any] | None,
    num_classes: int,
    in_chans: int,
    image_size: int,
    skip_init: bool | None,
    zero_init_residual: bool,
) -> nn.Module:
    """``timm.create_model(variant)`` with bnzoo's norm. With SkipInit, each block's last norm ``n`` becomes
    ``Sequential(n, SkipInit())``: keys ``bn2.0.*`` / ``bn3.0.*``, gain ``bn2.1.gain`` / ``bn3.1.gain``."""
    check_image_options(num_classes, in_chans, image_size)
    norm_layer = norm_factory(norm, norm_options)
    use_skip_init = _resolve_skip_init(norm_layer, skip_init, zero_init_residual)
    model = timm.create_model(
        variant,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        norm_layer=norm_layer.timm_layer(),
        zero_init_last=False,  # done below, on learnable weights only (timm's would zero frozen BN's buffer)
    )
    for block in list(model.modules()):
        for block_type, attribute in _TIMM_LAST_NORM.items():
            if isinstance(block, block_type):
                last_norm = getattr(block, attribute)
                if use_skip_init:
                    setattr(block, attribute, nn.Sequential(last_norm, SkipInit()))
                elif zero_init_residual:
                    zero_norm_weight_(last_norm)
    return model


_OPTIONS_DOC = """

    Options:
        norm: a kind of :func:`bnzoo.norms.list_norms` for every norm layer.
        norm_options: keyword options of that kind (e.g. ``{{"r_max": 2.0}}`` for renorm).
        num_classes, in_chans: classifier outputs and input channels.
        image_size: accepted for a uniform interface; any size works (global average pooling).
        skip_init: a learnable scalar gain, initialized to 0, at the end of each residual branch (De & Smith
            2020). None (default): on exactly when the norm is the identity (``none``).
        zero_init_residual: zero the last norm weight of each residual branch (Goyal et al. 2017), where that
            norm has a weight and ``skip_init`` is off. Default: {zero_init_default}.
    """


def _register_resnet(
    name: str, build: Callable[..., nn.Module], arch: Any, summary: str, zero_init_default: bool
) -> Callable[..., nn.Module]:
    """Register an entry point ``name`` calling ``build(arch, **options)``: one signature for all ResNets."""

    def entry(
        *,
        norm: str = "bn",
        norm_options: dict | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int = 32,
        skip_init: bool | None = None,
        zero_init_residual: bool = zero_init_default,
    ) -> nn.Module:
        return build(
            arch,
            norm=norm,
            norm_options=norm_options,
            num_classes=num_classes,
            in_chans=in_chans,
            image_size=image_size,
            skip_init=skip_init,
            zero_init_residual=zero_init_residual,
        )

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = summary + _OPTIONS_DOC.format(zero_init_default=zero_init_default)
    return register_model(entry)


def _cifar_summary(depth: int, params: str) -> str:
    n = (depth - 2) // 6
    return f"ResNet-{depth} for CIFAR (He et al. 2015, Sec. 4.2): n = {n} blocks per stage, {params} parameters."


def _timm_summary(variant: str) -> str:
    return f"timm's ``{variant}`` (ImageNet ResNet, He et al. 2015, Table 1) with bnzoo's norm layers."


resnet20 = _register_resnet("resnet20", _cifar_resnet, 20, _cifar_summary(20, "0.27M"), False)
resnet32 = _register_resnet("resnet32", _cifar_resnet, 32, _cifar_summary(32, "0.46M"), False)
resnet44 = _register_resnet("resnet44", _cifar_resnet, 44, _cifar_summary(44, "0.66M"), False)
resnet56 = _register_resnet("resnet56", _cifar_resnet, 56, _cifar_summary(56, "0.85M"), False)
resnet110 = _register_resnet("resnet110", _cifar_resnet, 110, _cifar_summary(110, "1.7M"), False)

# timm's own default is zero_init_last=True; it is kept.
timm_resnet18 = _register_resnet("timm_resnet18", _timm_resnet, "resnet18", _timm_summary("resnet18"), True)
timm_resnet34 = _register_resnet("timm_resnet34", _timm_resnet, "resnet34", _timm_summary("resnet34"), True)
timm_resnet50 = _register_resnet("timm_resnet50", _timm_resnet, "resnet50", _timm_summary("resnet50"), True)
