"""The norm factory: every kind in every layout, options, errors, and the non-batch kinds against references."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from bnzoo.norms import (
    BUILTIN_NORMS,
    LAYOUTS,
    FrozenBatchNorm,
    default_num_groups,
    freeze_norms,
    list_norms,
    make_norm,
    norm_layer,
    register_norm,
)

SHAPES = {"1d": (6, 8), "2d": (6, 8, 3, 3), "3d": (4, 8, 2, 3, 2), "seq": (5, 7, 8)}
LENGTHS = torch.tensor([7, 5, 3, 2, 1])
BUILTIN = ["none", "bn", "renorm", "gn", "ln", "frozen"]


def run(layer: nn.Module, x: torch.Tensor, layout: str) -> torch.Tensor:
    return layer(x, lengths=LENGTHS) if layout == "seq" else layer(x)


def test_builtin_kinds_are_listed() -> None:
    assert set(BUILTIN) == set(BUILTIN_NORMS)  # what bnzoo ships, whatever else is registered later
    assert set(BUILTIN) <= set(list_norms())
    assert list_norms() == sorted(list_norms())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", BUILTIN)
def test_every_kind_in_every_layout(kind: str, layout: str) -> None:
    layer = make_norm(kind, 8, layout)
    x = (torch.randn(SHAPES[layout]) * 3 + 2).requires_grad_()
    y = run(layer.train(), x, layout)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{kind}/{layout}: no gradient for {name}"
    layer.eval()
    with torch.no_grad():
        y1, y2 = run(layer, x, layout), run(layer, x, layout)
    torch.testing.assert_close(y1, y2)  # inference is deterministic and updates nothing
    if layout == "seq":  # padded steps are zero in every kind
        valid = torch.arange(SHAPES["seq"][1])[None] < LENGTHS[:, None]
        assert torch.all(y1[~valid] == 0)
    state = layer.state_dict()
    fresh = make_norm(kind, 8, layout)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x, layout), y1)


@pytest.mark.parametrize("kind", ["bn", "renorm", "frozen"])
def test_batch_kinds_keep_batchnorm_state_keys(kind: str) -> None:
    keys = set(make_norm(kind, 4, "2d").state_dict())
    assert keys - {"num_batches_tracked"} <= set(nn.BatchNorm2d(4).state_dict())
    assert {"weight", "bias", "running_mean", "running_var"} <= keys


def test_bn_is_torch_batchnorm() -> None:
    layer = make_norm("bn", 5, "2d", momentum=0.2)
    assert isinstance(layer, nn.BatchNorm2d) and layer.momentum == 0.2
    ref = nn.BatchNorm2d(5, momentum=0.2)
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown norm kind 'batchnorm'.*valid kinds: .*bn.*renorm"):
        make_norm("batchnorm", 4)
    with pytest.raises(ValueError, match=r"closest: renorm"):
        make_norm("renrom", 4)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ValueError, match=r"'bn' got unknown option\(s\) r_max; valid options for 'bn': eps, momentum"):
        make_norm("bn", 4, "2d", r_max=2.0)
    with pytest.raises(ValueError, match=r"valid options for 'none': none"):
        make_norm("none", 4, "2d", eps=1e-3)


def test_unknown_layout_lists_valid_layouts() -> None:
    with pytest.raises(ValueError, match=r"unknown norm layout '4d'; valid layouts: 1d, 2d, 3d, seq"):
        make_norm("bn", 4, "4d")


@pytest.mark.parametrize("kind", BUILTIN)
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_features(kind: str, bad: object) -> None:
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        make_norm(kind, bad)  # type: ignore[arg-type]


def test_bad_momentum_for_bn_is_named() -> None:
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\].*got 2"):
        make_norm("bn", 4, momentum=2)


def test_group_norm_default_and_override() -> None:
    assert [default_num_groups(c) for c in (1, 3, 16, 64, 96, 100, 256)] == [1, 1, 8, 32, 32, 25, 32]
    assert make_norm("gn", 16).num_groups == 8
    assert make_norm("gn", 16, num_groups=4).num_groups == 4
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide num_features=16; valid: \[1, 2, 4, 8, 16\]"):
        make_norm("gn", 16, num_groups=3)


def test_group_norm_matches_hand_computation() -> None:
    layer = make_norm("gn", 8, "2d", num_groups=2)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    groups = x.view(3, 2, 4 * 16)
    expected = (groups - groups.mean(-1, keepdim=True)) / (groups.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(layer.double()(x), expected.view_as(x))


def test_layer_norm_normalizes_each_position_over_channels() -> None:
    layer = make_norm("ln", 6, "2d").double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 4 + 1
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(layer(x), (x - mean) / (var + 1e-5).sqrt())


def test_frozen_norm_is_fixed_and_equals_trained_batchnorm_inference() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make_norm("bn", 4), nn.ReLU(), nn.Conv2d(4, 4, 1), make_norm("renorm", 4))
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 2 + 1)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    frozen = freeze_norms(model)
    assert isinstance(frozen[1], FrozenBatchNorm) and isinstance(frozen[4], FrozenBatchNorm)
    frozen.train()  # frozen layers ignore the mode: statistics neither used from the batch nor updated
    torch.testing.assert_close(frozen(x), expected)
    frozen(torch.randn(8, 3, 6, 6) * 10)
    torch.testing.assert_close(frozen(x), expected)
    assert not any(isinstance(p, nn.Parameter) for p in frozen[1].buffers())
    assert list(frozen[1].parameters()) == []


@pytest.mark.parametrize("kind", ["bn", "renorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_freezing_keeps_the_layers_dtype(kind: str, dtype: torch.dtype) -> None:
    # a float64 model failed after freeze_norms: the frozen copies were float32
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make_norm(kind, 4)).to(dtype)
    for _ in range(2):
        model(torch.randn(8, 3, 5, 5, dtype=dtype) * 2 + 1)
    model.eval()
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    expected = model(x)
    frozen = freeze_norms(model)
    assert {t.dtype for t in frozen[1].buffers()} == {dtype}
    torch.testing.assert_close(frozen(x), expected)


def test_freezing_a_batchnorm_without_running_statistics_is_refused() -> None:
    # it normalizes with each batch's statistics in inference too: a frozen copy with mean 0, var 1 would not
    with pytest.raises(ValueError, match="no running statistics.*track_running_stats=False"):
        freeze_norms(nn.Sequential(make_norm("bn", 4, track_running_stats=False)))


def test_frozen_accepts_batchnorm_state_dict() -> None:
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(8, 4, 2, 2) + 3)
    frozen = make_norm("frozen", 4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is accepted and ignored
    torch.testing.assert_close(frozen.running_mean, bn.running_mean)


def test_register_a_user_kind() -> None:
    @register_norm("test_scaled_bn", "BatchNorm followed by a fixed scale")
    def _build(num_features: int, layout: str, *, scale: float = 2.0) -> nn.Module:
        return nn.Sequential(make_norm("bn", num_features, layout), _Scale(scale))

    assert "test_scaled_bn" in list_norms()
    layer = make_norm("test_scaled_bn", 3, "1d", scale=3.0)
    y = layer(torch.randn(16, 3))
    torch.testing.assert_close(y.std(0, unbiased=False), torch.full((3,), 3.0), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="valid options for 'test_scaled_bn': scale"):
        make_norm("test_scaled_bn", 3, "1d", shift=1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_norm("test_scaled_bn")(_build)


class _Scale(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_norm_layer_callable_for_timm() -> None:
    factory = norm_layer("renorm", r_max=2.0)
    layer = factory(16, eps=1e-3)  # a model's own kwargs pass through when the kind accepts them
    assert layer.r_max == 2.0 and layer.eps == 1e-3 and layer.num_features == 16
    assert isinstance(norm_layer("none")(16, eps=1e-3), nn.Identity)  # and are dropped when it does not
    assert pickle.loads(pickle.dumps(factory))(4).r_max == 2.0
    with pytest.raises(ValueError, match="unknown option"):
        norm_layer("bn", r_max=2.0)


def test_norm_layer_goes_straight_into_timm() -> None:
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=3, norm_layer=norm_layer("renorm", r_max=2.0))
    renorms = [m for m in net.modules() if type(m).__name__ == "BatchRenorm2d"]
    assert renorms and all(m.r_max == 2.0 for m in renorms)
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
