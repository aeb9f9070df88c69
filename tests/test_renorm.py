"""Batch Renormalization against a float64 transcription of Ioffe 2017, Algorithm 1 (tests/norm_reference.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bnzoo.norms import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, make_norm
from tests.norm_reference import ReferenceRenorm


def drifting_batches(steps: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Batches whose per-channel mean and scale drift, so that both clips of r and d become active."""
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    view = [1, -1] + [1] * (len(shape) - 2)
    batches = []
    for t in range(steps):
        mean = torch.linspace(-1.0, 1.0, channels) * (1 + 3 * t)
        scale = torch.linspace(0.2, 4.0, channels) * (1 + 0.5 * t)
        batches.append(torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(view) + mean.view(view))
    return batches


@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (BatchRenorm1d, (16, 6)),
        (BatchRenorm1d, (8, 6, 5)),
        (BatchRenorm2d, (8, 6, 4, 3)),
        (BatchRenorm3d, (4, 6, 2, 3, 2)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_matches_algorithm_1(cls: type, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    eps, momentum, r_max, d_max = 1e-3, 0.3, 1.5, 0.5
    channels = shape[1]
    layer = cls(channels, eps=eps, momentum=momentum, r_max=r_max, d_max=d_max).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    ref = ReferenceRenorm(channels, eps, momentum, r_max, d_max)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    clipped_r = clipped_d = 0
    for x64 in drifting_batches(6, shape):
        gamma = layer.weight.detach().double().requires_grad_()
        beta = layer.bias.detach().double().requires_grad_()
        x_ref = x64.clone().requires_grad_()
        y_ref = ref.train_step(x_ref, gamma, beta)
        upstream = torch.randn_like(y_ref)
        gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, gamma, beta), upstream)

        layer.zero_grad()
        x = x64.to(dtype).requires_grad_()
        y = layer(x)
        y.backward(upstream.to(dtype))

        torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
        torch.testing.assert_close(x.grad.double(), gx_ref, **tol)
        torch.testing.assert_close(layer.weight.grad.double(), gw_ref, **tol)
        torch.testing.assert_close(layer.bias.grad.double(), gb_ref, **tol)
        torch.testing.assert_close(layer.running_mean.double(), ref.mu, **tol)
        torch.testing.assert_close(layer.running_var.double(), ref.sigma**2 - eps, **tol)
        clipped_r += int(((ref.r == r_max) | (ref.r == 1 / r_max)).sum())
        clipped_d += int((ref.d.abs() == d_max).sum())
        with torch.no_grad():  # a plain SGD step, so gamma and beta change between steps too
            layer.weight -= 0.1 * layer.weight.grad
            layer.bias -= 0.1 * layer.bias.grad
    assert clipped_r > 0 and clipped_d > 0, "the drifting batches must exercise both clips"
    assert int(layer.num_batches_tracked) == 6

    layer.eval()
    x64 = drifting_batches(1, shape, seed=1)[0]
    expected = ref.infer(x64, layer.weight.detach().double(), layer.bias.detach().double())
    torch.testing.assert_close(layer(x64.to(dtype)).double(), expected, **tol)


def test_unclipped_renorm_equals_batchnorm_outputs_and_gradients() -> None:
    renorm = BatchRenorm2d(5, r_max=1.0, d_max=0.0, momentum=0.1)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        for layer in (renorm, bn):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, 5))
    for step in range(3):
        x = (torch.randn(8, 5, 6, 6) * (step + 2) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        upstream = torch.randn(8, 5, 6, 6)
        renorm.zero_grad()
        bn.zero_grad()
        y1, y2 = renorm(x), bn(x2)
        y1.backward(upstream)
        y2.backward(upstream)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(renorm.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(renorm.bias.grad, bn.bias.grad, rtol=1e-5, atol=1e-4)


def test_gradcheck_float64() -> None:
    # r and d carry no gradient (stop_gradient in Alg. 1) while finite differences would see them move: with
    # running statistics far from the batch's, both are clipped in every channel and so locally constant, and
    # the numerical gradient checks the flow through mu_B and sigma_B.
    layer = BatchRenorm2d(3, r_max=1.2, d_max=0.1, momentum=0.5).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([5.0, -5.0, 5.0]))
        layer.running_var.copy_(torch.tensor([0.01, 0.01, 100.0]))
    buffers = {name: b.clone() for name, b in layer.named_buffers()}

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # fresh copies of the buffers each call: the layer updates its running statistics in place
        state = {"weight": weight, "bias": bias, **{k: v.clone() for k, v in buffers.items()}}
        return functional_call(layer, state, (x,))

    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_state_dict_round_trip_with_batchnorm() -> None:
    renorm = BatchRenorm2d(4)
    for _ in range(3):
        renorm(torch.randn(6, 4, 3, 3) * 3 + 1)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(renorm.state_dict())  # strict: exactly BatchNorm's keys
    assert set(renorm.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    renorm.eval()
    bn.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(renorm(x), bn(x))
    back = BatchRenorm2d(4)
    back.load_state_dict(bn.state_dict())
    back.eval()
    torch.testing.assert_close(back(x), bn(x))


def test_momentum_none_is_a_cumulative_average_like_batchnorm() -> None:
    layer = BatchRenorm1d(3, momentum=None, r_max=1.0, d_max=0.0)
    batches = [torch.randn(10, 3) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-5, atol=1e-5)


def test_reduced_precision_inputs_get_float32_statistics() -> None:
    layer = BatchRenorm2d(3)
    x = (torch.randn(16, 3, 5, 5) * 2 + 100).bfloat16()
    exact_mean = x.double().mean((0, 2, 3))
    layer(x)
    assert layer.running_mean.dtype == torch.float32
    # running_mean = 0.99 * 0 + 0.01 * batch mean: a bf16 batch mean (8 bits) would be off by ~0.2
    torch.testing.assert_close(layer.running_mean.double(), 0.01 * exact_mean, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchRenorm2d(4))
        out = model(torch.randn(4, 3, 8, 8))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.dtype == torch.float32


def test_channels_last_matches_contiguous() -> None:
    a = BatchRenorm2d(6, r_max=1.5, d_max=0.5)
    b = copy.deepcopy(a)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    xa = x.clone().requires_grad_()
    xb = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn_like(x)
    ya, yb = a(xa), b(xb)
    ya.backward(upstream)
    yb.backward(upstream.to(memory_format=torch.channels_last))
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(a.weight.grad, b.weight.grad)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_torch_compile_aot_eager_matches_eager() -> None:
    # gamma's gradient was 1-10% off: the compiled backward recomputed d from the updated running mean
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), make_norm("renorm", 4, "2d", r_max=1.5, d_max=0.5), nn.ReLU())
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8) * 2 + 1
        y1, y2 = eager(x), compiled(x)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(y1, y2)
        for (name, p1), p2 in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            torch.testing.assert_close(p1.grad, p2.grad, msg=lambda m, name=name: f"{name}.grad: {m}")
    for (name, b1), b2 in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b1, b2, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()


def test_one_value_per_channel_gets_batchnorms_error() -> None:
    with pytest.raises(ValueError) as bn_error:
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError) as renorm_error:
        BatchRenorm1d(3)(torch.randn(1, 3))
    assert str(renorm_error.value) == str(bn_error.value)
    BatchRenorm1d(3).eval()(torch.randn(1, 3))  # inference on one sample is fine


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"r_max": 0.5}, "r_max"),
        ({"d_max": -1.0}, "d_max"),
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": 1.5}, "momentum"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, named: str) -> None:
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"{named}.*{value}"):
        BatchRenorm2d(4, **kwargs)


def test_schedule_may_change_bounds_between_steps() -> None:
    layer = BatchRenorm1d(2, momentum=0.5)
    layer.r_max, layer.d_max = 1.0, 0.0  # plain BN
    layer.record_corrections = True
    layer(torch.randn(8, 2) * 5 + 3)
    assert torch.all(layer.last_r == 1.0) and torch.all(layer.last_d == 0.0)
    layer.r_max, layer.d_max = 3.0, 5.0
    layer(torch.randn(8, 2) * 5 + 3)
    assert torch.any(layer.last_r != 1.0) and torch.any(layer.last_d != 0.0)
    layer.r_max = 0.5
    with pytest.raises(ValueError, match="r_max"):
        layer(torch.randn(8, 2))


def test_eval_is_batchnorm_inference_on_running_statistics() -> None:
    layer = BatchRenorm2d(3)
    for _ in range(4):
        layer(torch.randn(6, 3, 4, 4) * 2 + 1)
    layer.eval()
    x = torch.randn(2, 3, 4, 4)
    view = (1, -1, 1, 1)
    expected = layer.weight.double().view(view) * (x.double() - layer.running_mean.double().view(view)) / (
        layer.running_var.double().view(view) + layer.eps
    ).sqrt() + layer.bias.double().view(view)
    torch.testing.assert_close(layer(x).double(), expected.detach(), rtol=1e-6, atol=1e-6)
