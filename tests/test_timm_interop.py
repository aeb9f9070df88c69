"""``bnzoo.norms.norm_layer(kind)`` in timm's own constructors, against timm's own models.

timm's CNNs use their norm layer in two ways: as a plain norm (ResNet: ``norm_layer(channels)``) or, through
``get_norm_act_layer``, as a norm + activation layer (``BatchNormAct2d``: EfficientNet, RegNet, DenseNet,
Inception-v3, ...). For each family whose constructor takes ``norm_layer`` (checked in timm's sources: those
that raise on it are listed in ``REFUSED_BY_TIMM``), ``norm_layer("bn")`` must give timm's own network --
the same module tree, the same activations (type and ``inplace``) at the same places, the same parameters
from the same seed, timm's state dict, and the same outputs -- and every other kind the same tree and
activations with its own norms.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnzoo.norms import BUILTIN_NORMS, FrozenBatchNorm, NormAct, freeze_norms, norm_layer, with_activation

# family -> (timm model name, input size)
FAMILIES = {
    "resnet": ("resnet18", 32),
    "resnetv2": ("resnetv2_50", 32),
    "efficientnet": ("efficientnet_b0", 32),
    "mnasnet": ("mnasnet_100", 32),
    "mixnet": ("mixnet_s", 32),
    "regnetx": ("regnetx_002", 32),
    "regnety": ("regnety_002", 32),
    "densenet": ("densenet121", 32),
    "inception_v3": ("inception_v3", 75),
    "cspnet": ("cspresnet50", 32),
    "xception": ("xception41", 32),
    "repvgg": ("repvgg_a0", 32),
}
# timm's builders for these pass their own norm_layer (or take none): a user's norm_layer is refused by timm
REFUSED_BY_TIMM = ["mobilenetv3_small_050", "mobilenetv4_conv_small", "lcnet_050", "ghostnet_100", "dla34"]
NUM_CLASSES = 3


# xception41's own default is partial(nn.BatchNorm2d, eps=1e-3), which any norm_layer given replaces: its
# reference is timm's model with torch's BatchNorm2d given the same way
REFERENCE_NORM: dict[str, type[nn.Module]] = {"xception41": nn.BatchNorm2d}


def build(model_name: str, norm: Any = None, **kwargs: Any) -> nn.Module:
    """timm's model with ``norm`` as its norm_layer, or timm's own (None); seeded, so the same init."""
    torch.manual_seed(0)
    norm = REFERENCE_NORM.get(model_name) if norm is None else norm
    if norm is not None:
        kwargs["norm_layer"] = norm
    return timm.create_model(model_name, num_classes=NUM_CLASSES, **kwargs)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm))


def act_signature(module: nn.Module) -> tuple[str, bool | None] | None:
    """(activation type, inplace) of a norm + activation layer, None for a plain norm."""
    act = getattr(module, "act", None)
    if not isinstance(act, nn.Module):
        return None
    return type(act).__name__, getattr(act, "inplace", None)


def assert_same_tree(ours: nn.Module, theirs: nn.Module, kind: str) -> int:
    """Same module names; each norm of timm's replaced by bnzoo's with the same activation (and dropout)
    after it; every other module of the same type. Returns the number of norm + activation layers."""
    mine, timms = dict(ours.named_modules()), dict(theirs.named_modules())
    assert list(mine) == list(timms), "the module trees differ"
    norm_acts = 0
    for name, reference in timms.items():
        module = mine[name]
        if is_norm(reference):
            plain_identity = kind == "none" and type(module) is nn.Identity and act_signature(reference) is None
            assert plain_identity or type(module).__module__.startswith("bnzoo.norms"), f"{name}: {type(module)}"
            assert act_signature(module) == act_signature(reference), f"{name}: activation differs"
            if act_signature(reference) is not None:
                norm_acts += 1
                assert isinstance(module, NormAct) and type(module.drop) is type(reference.drop), name
            if kind != "none":
                assert getattr(module, "num_features", None) == reference.num_features, name
        elif not (kind == "none" and isinstance(module, nn.Identity)):
            assert type(module) is type(reference), f"{name}: {type(module).__name__} != {type(reference).__name__}"
    return norm_acts


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bn_kind_gives_timms_own_model(family: str) -> None:
    model_name, size = FAMILIES[family]
    theirs, ours = build(model_name, None), build(model_name, norm_layer("bn"))
    norm_acts = assert_same_tree(ours, theirs, "bn")
    if family not in ("resnet", "resnetv2", "repvgg", "xception"):  # these call it as a plain norm only
        assert norm_acts > 0, "the family was expected to use norm + activation layers"
    # same initialization from the same seed, and timm's state dict, strictly
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        assert torch.equal(ours_state[key], value), key
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # one training-mode batch gives both non-trivial running statistics
        torch.testing.assert_close(ours.train()(x), theirs.train()(x))
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    ours_state = ours.state_dict()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours_state[key], value, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in BUILTIN_NORMS if k != "bn"])
@pytest.mark.parametrize("family", ["efficientnet", "regnetx", "densenet", "inception_v3", "resnet"])
def test_every_kind_keeps_every_activation(family: str, kind: str) -> None:
    model_name, size = FAMILIES[family]
    # timm's RegNet init zeroes each block's last norm weight, which "none" (an identity) lacks: timm raises
    kwargs = {"zero_init_last": False} if (family, kind) == ("regnetx", "none") else {}
    theirs = build(model_name, None, **kwargs)
    ours = build(model_name, norm_layer(kind), **kwargs)
    assert_same_tree(ours, theirs, kind)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert ours.train()(x).shape == (2, NUM_CLASSES)
        assert torch.isfinite(ours.eval()(x)).all()


@pytest.mark.parametrize("model_name", REFUSED_BY_TIMM)
def test_families_without_a_norm_layer_argument_refuse_it(model_name: str) -> None:
    # documented, not silent: timm raises for these (were one to start accepting norm_layer, add it above)
    with pytest.raises(TypeError, match="norm_layer"):
        timm.create_model(model_name, num_classes=NUM_CLASSES, norm_layer=norm_layer("renorm"))


def test_norm_act_layer_is_timms_batchnormact2d() -> None:
    """What timm's get_norm_act_layer builds from norm_layer("bn"), against BatchNormAct2d, argument for
    argument: activation from act_layer and act_kwargs (inplace defaulting to True), apply_act, drop_layer."""
    from timm.layers import BatchNormAct2d, get_norm_act_layer

    ours_factory = get_norm_act_layer(norm_layer("bn"), act_layer="silu")
    theirs_factory = get_norm_act_layer(nn.BatchNorm2d, act_layer="silu")
    x = torch.randn(4, 8, 3, 3)
    for kwargs in (
        {},
        {"apply_act": False},
        {"act_kwargs": {"inplace": False}},
        {"inplace": False},
        {"drop_layer": nn.Dropout},
        {"eps": 1e-3, "momentum": 0.2},
    ):
        torch.manual_seed(0)
        ours, theirs = ours_factory(8, **kwargs), theirs_factory(8, **kwargs)
        assert isinstance(theirs, BatchNormAct2d)
        assert act_signature(ours) == act_signature(theirs) and type(ours.drop) is type(theirs.drop), kwargs
        assert (ours.eps, ours.momentum) == (theirs.eps, theirs.momentum)
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours.eval()(x.clone()), theirs.eval()(x.clone()), msg=str(kwargs))


def test_plain_norm_layer_calls_get_no_activation() -> None:
    layer = norm_layer("renorm", r_max=2.0)(8, eps=1e-3)
    assert not isinstance(layer, NormAct) and not hasattr(layer, "act")
    assert layer.eps == 1e-3 and layer.r_max == 2.0


def test_norm_layer_honours_timms_device_and_dtype() -> None:
    layer = norm_layer("renorm")(8, device="cpu", dtype=torch.float64)
    assert {t.dtype for t in layer.state_dict().values() if t.is_floating_point()} == {torch.float64}


def test_norm_act_layers_pickle_copy_and_freeze_with_their_activation() -> None:
    import copy

    model = build("efficientnet_b0", norm_layer("renorm"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)
        expected = model.eval()(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            torch.testing.assert_close(clone(x), expected)
        frozen = freeze_norms(copy.deepcopy(model))
        assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
        assert_same_tree(frozen, model, "frozen")
        torch.testing.assert_close(frozen(x), expected)


def test_freezing_timms_own_batchnormact_keeps_its_activation() -> None:
    model = build("regnetx_002", None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)
        expected = model.eval()(x)
        frozen = freeze_norms(model)
        assert_same_tree(frozen, build("regnetx_002", None), "frozen")
        torch.testing.assert_close(frozen(x), expected)


def test_with_activation_keeps_the_layer_and_its_state() -> None:
    layer = norm_layer("bn")(4)
    keys = list(layer.state_dict())
    same = with_activation(layer, nn.ReLU())
    assert same is layer and isinstance(layer, nn.BatchNorm2d) and list(layer.state_dict()) == keys
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(
        layer.eval()(x),
        torch.relu(nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)),
    )
