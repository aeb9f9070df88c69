"""Folding norms into the conv/linear layer before them (``bnzoo.norms.fuse_norms`` / ``fold_norms``,
``bnzoo export --fuse``): every zoo image model with bn / renorm / frozen and random non-trivial statistics gives
the unfused model's eval outputs (float32 and float64), loads into its ``norm="none"`` build with a strict
state dict and computes the same there; norms that cannot fold are left and named; training mode is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from bnzoo import create_model, list_models, model_options
from bnzoo.cli import main
from bnzoo.norms import FrozenBatchNorm, add_conv_biases_, fold_norms, fuse_norms, make_norm
from bnzoo.norms.fusion import fold_into
from bnzoo.norms.introspect import NORM_TYPES
from bnzoo.zoo import pretrained_info

IMAGE_MODELS = [name for name in list_models() if "image_size" in model_options(name)]
KINDS = ("bn", "renorm", "frozen")
#: the input size per model (Inception-v3 needs 75 pixels, the rest take 32)
SIZES = {"timm_inception_v3": 75}
#: models whose float64 run is long on a 2-core machine (the float32 run covers them on every kind)
HEAVY = {"timm_resnet50", "timm_inception_v3", "resnet110", "resnet56"}


def randomize_norms_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters in every norm layer: mean N(0, 0.5), variance
    U(0.5, 2), gamma U(0.5, 1.5) with a random sign, beta N(0, 0.5)."""
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: Tensor | None, values: Tensor) -> None:
        if tensor is not None:
            tensor.data.copy_(values.to(tensor.dtype))

    with torch.no_grad():
        for layer in model.modules():
            if not hasattr(layer, "running_mean") or layer.running_mean is None:
                continue
            c = layer.running_mean.shape[0]
            fill(layer.running_mean, 0.5 * torch.randn(c, generator=generator))
            fill(layer.running_var, 0.5 + 1.5 * torch.rand(c, generator=generator))
            sign = torch.where(torch.rand(c, generator=generator) < 0.2, -1.0, 1.0)
            fill(getattr(layer, "weight", None), sign * (0.5 + torch.rand(c, generator=generator)))
            fill(getattr(layer, "bias", None), 0.5 * torch.randn(c, generator=generator))


def build(name: str, norm: str, dtype: torch.dtype, **options) -> tuple[nn.Module, Tensor]:
    size = SIZES.get(name, 32)
    model = create_model(name, norm=norm, image_size=size, **options).to(dtype).eval()
    randomize_norms_(model)
    return model, torch.randn(2, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))


def none_architecture(name: str, dtype: torch.dtype) -> nn.Module:
    """``name`` built with ``norm="none"`` (no SkipInit gains: the normalized network had none)."""
    options = {"skip_init": False} if "skip_init" in model_options(name) else {}
    return create_model(name, norm="none", image_size=SIZES.get(name, 32), **options).to(dtype).eval()


def count_norms(model: nn.Module) -> int:
    return sum(isinstance(m, NORM_TYPES) for m in model.modules())


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_fused(name: str, kind: str, dtype: torch.dtype, tolerance: float) -> None:
    model, x = build(name, kind, dtype)
    norms = count_norms(model)
    with torch.no_grad():
        reference = model(x)
    report = fold_norms(model)
    fused = report.model
    assert fused is not model and count_norms(model) == norms  # inplace=False: the original is untouched
    assert (len(report.fused), report.skipped) == (norms, {})
    assert count_norms(fused) == 0
    with torch.no_grad():
        out = fused(x)
    assert relative_error(out, reference) <= tolerance
    # the fused weights load, strictly, into the norm="none" build and compute the same there
    target = none_architecture(name, dtype)
    added = add_conv_biases_(target)
    assert bool(added) == name.startswith("timm_")  # the zoo's own units have a bias exactly under "none"
    target.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(target(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_fused_float32_model_equals_the_unfused_one(name: str, kind: str) -> None:
    check_fused(name, kind, torch.float32, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [n for n in IMAGE_MODELS if n not in HEAVY])
def test_fused_float64_model_equals_the_unfused_one(name: str, kind: str) -> None:
    check_fused(name, kind, torch.float64, 1e-12)


def test_the_image_models_are_all_covered() -> None:
    assert {"resnet20", "bn_inception_small", "mlp", "timm_resnet18", "timm_inception_v3"} <= set(IMAGE_MODELS)


@pytest.mark.parametrize(
    "kind, options",
    [("bn", {"virtual_batch_size": 2}), ("renorm", {"virtual_batch_size": 2}), ("bn", {"affine": False})],
)
def test_ghost_batch_and_affine_free_norms_fold_too(kind: str, options: dict) -> None:
    model, x = build("resnet20", kind, torch.float64, norm_options=options)
    report = fold_norms(model, example_input=x)
    assert len(report.fused) == 19 and not report.skipped
    assert report.max_error is not None and report.max_error <= 1e-12


# -- one layer against torch's own fusion -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_one_conv_matches_torchs_fuse_conv_bn_weights(kind: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, groups=3, bias=True).double()
    norm = make_norm(kind, 6, "2d").double().eval()
    randomize_norms_(norm)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    fold_into(conv, norm)
    torch.testing.assert_close(conv.weight, weight, rtol=1e-14, atol=0)
    torch.testing.assert_close(conv.bias, bias, rtol=1e-14, atol=1e-15)


def test_one_linear_without_bias_matches_torchs_fuse_linear_bn_weights() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(5, 4, bias=False).double()
    norm = make_norm("bn", 4, "1d").double().eval()
    randomize_norms_(norm)
    weight, bias = fuse_linear_bn_weights(
        linear.weight,
        torch.zeros(4, dtype=torch.float64),
        norm.running_mean,
        norm.running_var,
        norm.eps,
        norm.weight,
        norm.bias,
    )
    fold_into(linear, norm)
    assert isinstance(linear.bias, nn.Parameter)
    torch.testing.assert_close(linear.weight, weight, rtol=1e-14, atol=0)
    torch.testing.assert_close(linear.bias, bias, rtol=1e-14, atol=1e-15)


# -- what is left alone, and why ----------------------------------------------------------------------------------
class ResidualConv(nn.Module):
    """A conv whose output goes to the norm *and* to the addition: folding would change the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = make_norm("bn", 4, "2d")

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class SharedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.norm = FrozenBatchNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.a(x)) + self.norm(self.b(x))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(4, 8, 1), make_norm("gn", 8, "2d")
        self.conv2, self.untracked = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, track_running_stats=False)
        self.conv3, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv3(self.untracked(self.conv2(self.gn(self.conv1(x))))))


@pytest.mark.parametrize(
    "module, expected",
    [
        (ResidualConv(), {"norm": "also goes to the operation add"}),
        (SharedNorm(), {"norm": "called 2 times"}),
        (Mixed(), {"gn": "own statistics", "untracked": "no running statistics"}),
    ],
)
def test_norms_that_cannot_fold_are_left_and_named(module: nn.Module, expected: dict[str, str]) -> None:
    model = module.double().eval()
    randomize_norms_(model)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    with pytest.warns(UserWarning, match="left .* norm layers unfolded"):
        fused = fuse_norms(model, example_input=x)
    report = fold_norms(model)
    assert set(report.skipped) == set(expected)
    for name, phrase in expected.items():
        assert phrase in report.skipped[name]
        assert isinstance(fused.get_submodule(name), NORM_TYPES)
    assert set(report.fused) == ({"bn"} if isinstance(module, Mixed) else set())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference, rtol=1e-12, atol=1e-12)


def test_a_norm_after_the_activation_is_not_folded() -> None:
    model, x = build("mlp", "bn", torch.float64, norm_position="after")
    report = fold_norms(model, example_input=x)
    assert not report.fused and len(report.skipped) == 3
    assert all("Sigmoid" in why for why in report.skipped.values())
    assert "folded 0 of 3 norm layers" in str(report)


def test_a_norm_act_layer_keeps_its_activation() -> None:
    model, x = build("timm_resnet18", "bn", torch.float32)
    add_conv_biases_(model)  # and an existing conv bias is folded too
    fused = fuse_norms(model, example_input=x)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-5
    conv_unit = create_model("timm_inception_v3", norm="bn", image_size=75).eval()
    fused = fuse_norms(conv_unit, inplace=True)
    assert fused is conv_unit
    unit = fused.Conv2d_1a_3x3
    assert isinstance(unit.bn.act, nn.ReLU) and not isinstance(unit.bn, NORM_TYPES)


def test_training_mode_is_refused_by_name() -> None:
    model = create_model("resnet20", norm="bn")
    with pytest.raises(ValueError, match=r"CifarResNet is in training mode .*model.eval\(\)"):
        fold_norms(model)
    model.eval()
    model.stem.norm.train()
    with pytest.raises(ValueError, match=r"training mode \(stem.norm\)"):
        fuse_norms(model)


def test_a_wrong_fold_is_caught_on_the_example_input(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnzoo.norms.fusion as fusion

    model, x = build("resnet20", "bn", torch.float32)
    monkeypatch.setattr(fusion, "_affine", lambda norm, c: (torch.ones(c).double(), torch.zeros(c).double()))
    with pytest.raises(RuntimeError, match="changed the output of CifarResNet"):
        fold_norms(model, example_input=x)


# -- bnzoo export --fuse ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["fashion_mnist-resnet20-renorm", "fashion_mnist-bn_inception_small-bn", "digits-mlp-bn"]
)
def test_export_fuse_writes_the_norm_free_network(name: str, tmp_path: Path) -> None:
    output = tmp_path / "fused.safetensors"
    assert main(["export", name, "--fuse", "-o", str(output)]) == 0
    entry = pretrained_info(name)
    original = create_model(entry["model"], pretrained=name).eval()
    fused = create_model(entry["model"], pretrained=str(output)).eval()
    assert count_norms(fused) == 0 and count_norms(original) > 0
    options = entry["create_options"]
    size = options["image_size"]
    x = torch.randn(4, options["in_chans"], size, size)
    with torch.no_grad():
        assert relative_error(fused(x), original(x)) <= 1e-5


def test_export_fuse_refuses_a_network_with_norms_it_cannot_fold(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output = tmp_path / "never.safetensors"
    assert main(["export", "fashion_mnist_row-ds2_gru-bn", "--fuse", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert "cannot export fashion_mnist_row-ds2_gru-bn fused" in err and "a sequence norm" in err
    assert not output.exists()
