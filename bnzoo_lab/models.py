"""Models for the claims experiments, registered in bnzoo's model registry by
:func:`bnzoo_lab.registrations.lab_registrations`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from bnzoo.models.layers import check_image_options
from bnzoo.models.registry import build_model
from bnzoo.models.resnet import CifarResNet
from bnzoo.norms.factory import make_norm

__all__ = ["cifar_resnet", "input_norm_mlp"]


def input_norm_mlp(
    *,
    norm: str = "none",
    norm_options: dict | None = None,
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 32,
    input_norm: str = "bn",
    hidden: Sequence[int] = (100, 100, 100),
    activation: str = "relu",
    init_scale: float = 1.0,
) -> nn.Module:
    """Flatten, a norm of kind ``input_norm`` over the input features, then bnzoo's ``mlp`` (claim C13: BN as "an
    alternate to data preparation", standardizing raw inputs of differing scales).

    Options: ``norm``/``norm_options`` are the hidden layers' norm (default none, so that only the input is
    normalized); ``hidden``, ``activation`` and ``init_scale`` are the MLP's; the input norm has the default
    options of its kind.
    """
    features = in_chans * image_size**2
    mlp = build_model(
        "mlp", norm=norm, norm_options=norm_options, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
        hidden=hidden, activation=activation, init_scale=init_scale,
    )  # fmt: skip
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), input_norm=make_norm(input_norm, features, "1d"), mlp=mlp))


def cifar_resnet(
    *,
    depth: int = 8,
    norm: str = "bn",
    norm_options: dict | None = None,
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 32,
    skip_init: bool | None = None,
) -> nn.Module:
    """bnzoo's CIFAR ResNet (He et al. 2015, Sec. 4.2) of any depth ``6n + 2`` -- e.g. ResNet-8, one block per
    stage, a third of ResNet-20's cost (claims C2/C3 on a CPU budget). ``skip_init`` as for ``resnet20``: None
    (SkipInit exactly when ``norm="none"``), True or False (``norm="none"`` without SkipInit: the same network
    without its norms)."""
    check_image_options(num_classes, in_chans, image_size)
    return CifarResNet(depth, norm=norm, norm_options=norm_options, num_classes=num_classes, in_chans=in_chans,
                       skip_init=skip_init)  # fmt: skip
