"""``bnzoo.norms.convert_norms`` / ``revert_norms`` on torchvision's and timm's own models, against the originals.

Every model is built with torch's / timm's own BatchNorm layers, given random affine parameters and running
statistics (so that a conversion that dropped or mixed them up would change the outputs), and run in float64
on tiny inputs. bn <-> renorm <-> frozen must give the original model's eval outputs exactly (the same
per-channel affine of the same statistics); the converted bn must give the original's training-mode outputs and
every gradient.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d, DropPath
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnzoo
from bnzoo.norms import (
    BatchNorm2d,
    BatchRenorm2d,
    ChannelGroupNorm,
    ChannelLayerNorm,
    FrozenBatchNorm,
    convert_norms,
    convert_sync_norms,
    freeze_norms,
    replace_modules,
    revert_norms,
)
from bnzoo.norms.introspect import is_batchnorm_like, named_batchnorm_like, norm_layout

# name -> (builder, number of BatchNorm-like layers counted by hand from the architecture)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # 1 stem + 8 blocks x 2 + 3 downsample shortcuts
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 20),
    # torchvision's MobileNetV3-Small: 34 BatchNorm2d
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), 34),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=5), 20),
    # stem + head + 16 MBConv blocks (first: 2 norms, others: 3) = 2 + 2 + 15 * 3
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=5, drop_path_rate=0.1), 49),
    # stem + 13 blocks x 3 + 4 downsample shortcuts (one per stage)
    "timm_regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=5), 44),
}
X = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def randomized(model: nn.Module) -> nn.Module:
    """``model`` in float64, eval mode, with random affine and running statistics in every BatchNorm."""
    model = model.double().eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, _BatchNorm):
                channels = layer.num_features
                layer.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
                layer.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
                layer.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64) * 0.1)
                layer.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
                layer.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def original(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, randomized(MODELS[request.param][0]())


def kind_counts(model: nn.Module) -> Counter[str]:
    return Counter(type(m).__name__ for m in named_batchnorm_like(model).values())


def activations(model: nn.Module) -> dict[str, tuple[type[nn.Module], ...]]:
    """``{norm layer name: (type of drop, type of act)}`` of every norm + activation layer."""
    return {
        name: (type(m.drop), type(m.act))
        for name, m in model.named_modules()
        if is_batchnorm_like(m) and isinstance(getattr(m, "act", None), nn.Module)
    }


def test_hand_counts_match_the_models(original: tuple[str, nn.Module]) -> None:
    name, model = original
    assert len(named_batchnorm_like(model)) == MODELS[name][1]


def test_bn_renorm_frozen_bn_keep_eval_outputs_counts_activations_and_keys(original: tuple[str, nn.Module]) -> None:
    name, model = original
    count = MODELS[name][1]
    with torch.no_grad():
        reference = model(X)
    keys = set(model.state_dict())
    acts = activations(model)
    assert acts or name.startswith("tv_") or name == "timm_resnet18"  # timm's CNNs use norm + activation layers
    drop_paths = sum(isinstance(m, DropPath) for m in model.modules())
    converted = copy.deepcopy(model)
    for kind, cls in (("renorm", BatchRenorm2d), ("frozen", FrozenBatchNorm), ("bn", BatchNorm2d)):
        converted = convert_norms(converted, kind)
        layers = named_batchnorm_like(converted)
        assert len(layers) == count and all(isinstance(m, cls) for m in layers.values()), kind_counts(converted)
        assert activations(converted) == acts
        assert sum(isinstance(m, DropPath) for m in converted.modules()) == drop_paths
        with torch.no_grad():
            out = converted(X)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12, msg=f"after {kind}")
        expected_keys = {k for k in keys if not k.endswith("num_batches_tracked")} if kind == "frozen" else keys
        assert set(converted.state_dict()) == expected_keys
    state = converted.state_dict()
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    reverted = revert_norms(converted)
    assert all(type(m) in (nn.BatchNorm2d, BatchNormAct2d) for m in named_batchnorm_like(reverted).values())
    assert kind_counts(reverted) == kind_counts(model)
    assert activations(reverted) == acts
    with torch.no_grad():
        torch.testing.assert_close(reverted(X), reference, rtol=1e-12, atol=1e-12)


def test_converted_bn_trains_as_the_original(original: tuple[str, nn.Module]) -> None:
    """Training mode: the same outputs, running statistics and gradients of every parameter and the input."""
    _, model = original
    model = copy.deepcopy(model).train()
    converted = convert_norms(copy.deepcopy(model), "bn")
    outputs, grads, stats = [], [], []
    for net in (model, converted):
        x = X.clone().requires_grad_(True)
        torch.manual_seed(4)  # the same drop path / dropout masks in both
        out = net(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append({"input": x.grad, **{n: p.grad for n, p in net.named_parameters()}})
        stats.append({n: b for n, b in net.named_buffers()})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-9, atol=1e-12, msg=key)
    for key in stats[0]:
        torch.testing.assert_close(stats[1][key], stats[0][key], rtol=1e-12, atol=1e-12, msg=key)


def test_to_gn_and_ln_copies_the_affine_drops_statistics_in_one_warning() -> None:
    model = randomized(timm.create_model("efficientnet_b0", num_classes=5))
    originals = {n: (m.weight.clone(), m.bias.clone()) for n, m in named_batchnorm_like(model).items()}
    acts = activations(model)
    for kind, cls in (("gn", ChannelGroupNorm), ("ln", ChannelLayerNorm)):
        with pytest.warns(UserWarning, match=rf"norm kind '{kind}' has no place for the running statistics") as seen:
            converted = convert_norms(copy.deepcopy(model), kind)
        assert len([w for w in seen if "running statistics" in str(w.message)]) == 1
        assert "49 layers" in str(seen[0].message)
        assert not named_batchnorm_like(converted)
        layers = {n: m for n, m in converted.named_modules() if isinstance(m, cls)}
        assert layers.keys() == originals.keys()
        for n, layer in layers.items():
            torch.testing.assert_close(layer.weight, originals[n][0], rtol=0, atol=0)
            torch.testing.assert_close(layer.bias, originals[n][1], rtol=0, atol=0)
            assert layer.running_mean is None if hasattr(layer, "running_mean") else True
        assert {n: t for n, t in activations_any(converted).items()} == acts
        # the per-sample norm, against torch's own functional one on a layer's input
        name = "blocks.1.0.bn1"
        layer = layers[name]
        x = torch.randn(2, layer.num_features, 4, 4, dtype=torch.float64)
        groups = layer.num_groups if kind == "gn" else None
        expected = (
            nn.functional.group_norm(x, groups, layer.weight, layer.bias, layer.eps)
            if kind == "gn"
            else nn.functional.layer_norm(x.movedim(1, -1), (x.shape[1],), layer.weight, layer.bias, layer.eps).movedim(
                -1, 1
            )
        )
        torch.testing.assert_close(layer(x), acts_of(layer)(expected), rtol=1e-12, atol=1e-12)


def activations_any(model: nn.Module) -> dict[str, tuple[type[nn.Module], ...]]:
    return {
        n: (type(m.drop), type(m.act))
        for n, m in model.named_modules()
        if isinstance(m, (ChannelGroupNorm, ChannelLayerNorm, _BatchNorm))
        and isinstance(getattr(m, "act", None), nn.Module)
    }


def acts_of(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: layer.act(layer.drop(x))


def test_convnext_has_nothing_batchnorm_like_conversion_is_a_no_op_with_a_warning() -> None:
    model = timm.create_model("convnext_atto", num_classes=5).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.warns(UserWarning, match=r"ConvNeXt has no BatchNorm-like layer \(its norm layers: LayerNorm2d x \d+"):
        converted = convert_norms(model, "bn")
    assert converted is model and list(model.modules()) == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_include_and_exclude_select_by_module_name() -> None:
    model = randomized(torchvision.models.resnet18(num_classes=5))
    only_layer1 = convert_norms(copy.deepcopy(model), "renorm", include="layer1.*")
    renormed = {n for n, m in only_layer1.named_modules() if isinstance(m, BatchRenorm2d)}
    assert renormed == {f"layer1.{b}.bn{i}" for b in (0, 1) for i in (1, 2)}
    no_shortcuts = convert_norms(copy.deepcopy(model), "frozen", exclude=["*.downsample.*", "bn1"])
    frozen = {n for n, m in no_shortcuts.named_modules() if isinstance(m, FrozenBatchNorm)}
    assert len(frozen) == 16 and not any("downsample" in n for n in frozen) and "bn1" not in frozen
    assert type(no_shortcuts.bn1) is nn.BatchNorm2d and type(no_shortcuts.layer2[0].downsample[1]) is nn.BatchNorm2d
    both = convert_norms(copy.deepcopy(model), "renorm", include="layer2.*", exclude="*.downsample.*")
    assert {n for n, m in both.named_modules() if isinstance(m, BatchRenorm2d)} == {
        f"layer2.{b}.bn{i}" for b in (0, 1) for i in (1, 2)
    }
    with pytest.raises(
        ValueError, match=r"include pattern 'layer9\.\*' matches no BatchNorm-like layer.*layer1\.0\.bn1"
    ):
        convert_norms(copy.deepcopy(model), "renorm", include="layer9.*")
    with pytest.raises(ValueError, match=r"exclude pattern 'nope' matches no"):
        convert_norms(copy.deepcopy(model), "renorm", exclude="nope")
    with pytest.raises(TypeError, match="include must be a module-name pattern"):
        convert_norms(copy.deepcopy(model), "renorm", include=3)


def test_options_are_carried_and_overridden_bad_ones_name_the_valid_choices() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    renormed = convert_norms(copy.deepcopy(model), "renorm", r_max=2.0)
    assert (renormed[1].eps, renormed[1].momentum, renormed[1].r_max) == (1e-3, 0.3, 2.0)
    assert convert_norms(copy.deepcopy(model), "renorm", momentum=0.01)[1].momentum == 0.01
    ghost = convert_norms(copy.deepcopy(model), "bn", virtual_batch_size=2)[1]
    assert ghost.virtual_batch_size == 2 and ghost.momentum == 0.3
    assert convert_norms(copy.deepcopy(ghost), "renorm").virtual_batch_size == 2  # carried on from the ghost bn
    with pytest.raises(ValueError, match=r"unknown norm kind 'renrom'; closest: renorm; valid kinds: .*bn.*frozen"):
        convert_norms(model, "renrom")
    with pytest.raises(ValueError, match=r"got unknown option\(s\) rmax; valid options for 'renorm': eps, momentum"):
        convert_norms(model, "renorm", rmax=2.0)
    with pytest.raises(ValueError, match=r"unknown norm layout '4d'; valid layouts: 1d, 2d, 3d, seq"):
        convert_norms(model, "renorm", layout="4d")
    stateless = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"layer '0' \(BatchNorm1d\) has no running statistics.*'frozen'"):
        convert_norms(stateless, "frozen")
    kept = convert_norms(copy.deepcopy(stateless), "bn")[0]  # carries track_running_stats=False: same meaning
    x = torch.randn(5, 4)
    torch.testing.assert_close(kept.eval()(x), stateless.eval()(x))


class Detectron2FrozenBatchNorm2d(nn.Module):
    """detectron2's ``FrozenBatchNorm2d`` (detectron2/layers/batch_norm.py), reduced to what it computes."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def test_layouts_frozen_foreign_layers_sync_batchnorm_and_the_root() -> None:
    generator = torch.Generator().manual_seed(3)
    tv_frozen = torchvision.ops.FrozenBatchNorm2d(6)
    d2_frozen = Detectron2FrozenBatchNorm2d(6)
    for layer in (tv_frozen, d2_frozen):
        for name in ("weight", "bias", "running_mean"):
            getattr(layer, name).copy_(torch.randn(6, generator=generator))
        layer.running_var.copy_(torch.rand(6, generator=generator) + 0.5)
    x = torch.randn(3, 6, 5, 5)
    for layer in (tv_frozen, d2_frozen):
        assert is_batchnorm_like(layer) and norm_layout(layer) == "2d"
        as_bn = convert_norms(copy.deepcopy(layer), "bn")
        assert type(as_bn) is BatchNorm2d and as_bn.weight.requires_grad
        torch.testing.assert_close(as_bn.eval()(x), layer(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            convert_norms(copy.deepcopy(layer), "renorm").eval()(x), layer(x), rtol=1e-6, atol=1e-6
        )
    bn3d = nn.BatchNorm3d(2).eval()
    frozen3d = convert_norms(bn3d, "frozen")
    assert norm_layout(frozen3d) == "3d" and type(convert_norms(frozen3d, "bn")) is bnzoo.norms.BatchNorm3d
    sync = nn.SyncBatchNorm(6)
    with pytest.raises(ValueError, match=r"takes any \(N, C, \*\) input.*pass layout= one of 1d, 2d, 3d, seq"):
        convert_norms(sync, "renorm")
    assert type(convert_norms(sync, "renorm", layout="2d")) is BatchRenorm2d


def test_norm_act_keeps_its_very_drop_and_act_modules() -> None:
    layer = BatchNormAct2d(4, act_layer=nn.GELU, drop_layer=lambda: nn.Dropout(0.25))
    drop, act = layer.drop, layer.act
    renormed = convert_norms(nn.Sequential(layer), "renorm")[0]
    assert isinstance(renormed, BatchRenorm2d) and renormed.drop is drop and renormed.act is act
    frozen = convert_norms(nn.Sequential(renormed), "frozen")[0]
    assert frozen.drop is drop and frozen.act is act
    back = revert_norms(nn.Sequential(frozen))[0]
    assert type(back) is BatchNormAct2d and back.drop is drop and back.act is act


def test_training_mode_device_dtype_and_requires_grad_are_kept() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3).eval()).double()
    model[0].weight.requires_grad_(False)
    converted = convert_norms(model, "renorm")
    assert [m.training for m in converted] == [True, False]
    assert converted[0].weight.dtype == torch.float64 and converted[0].running_mean.dtype == torch.float64
    assert converted[0].weight.requires_grad is False and converted[1].weight.requires_grad is True


def test_sequence_norms_are_converted_and_refused_by_revert() -> None:
    seq = bnzoo.make_norm("bn", 4, "seq")
    renormed = convert_norms(seq, "renorm")
    assert type(renormed).__name__ == "SequenceBatchRenorm"
    with pytest.raises(ValueError, match=r"is a sequence norm \(batch, time, features\): torch and timm have no"):
        revert_norms(renormed)


def test_replace_modules_keeps_shared_modules_shared_and_backs_freeze_and_sync() -> None:
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    replaced = replace_modules(model, lambda _n, m: isinstance(m, nn.BatchNorm2d), lambda _n, m: nn.Identity())
    assert isinstance(replaced[0], nn.Identity) and replaced[0] is replaced[2]
    seen: list[str] = []
    replace_modules(torchvision.models.resnet18(), lambda n, m: seen.append(n) or False, lambda _n, m: m)
    assert seen[:4] == ["", "conv1", "bn1", "relu"] and "layer1.0.bn1" in seen  # the root first, as ""
    # the refactored conversions: freeze_norms and convert_sync_norms on one model
    net = randomized(torchvision.models.resnet18(num_classes=5))
    with torch.no_grad():
        reference = net(X)
    frozen = freeze_norms(copy.deepcopy(net))
    assert len([m for m in frozen.modules() if isinstance(m, FrozenBatchNorm)]) == 20
    with torch.no_grad():
        torch.testing.assert_close(frozen(X), reference, rtol=1e-12, atol=1e-12)
    synced = convert_sync_norms(copy.deepcopy(net))
    assert all(type(m) is BatchNorm2d and m.synchronized for m in named_batchnorm_like(synced).values())
    reverted = bnzoo.norms.revert_sync_norms(synced)
    assert all(type(m) is nn.BatchNorm2d for m in named_batchnorm_like(reverted).values())


def test_public_api() -> None:
    assert bnzoo.convert_norms is convert_norms and bnzoo.revert_norms is revert_norms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_norms(nn.Sequential(nn.BatchNorm1d(3)), "renorm")  # bn -> renorm: nothing dropped, no warning
