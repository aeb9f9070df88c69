"""Ghost batches (``virtual_batch_size``) for ``bn`` and ``renorm`` against a float64 reference written here.

The reference loops over the groups of k consecutive samples and applies Ioffe & Szegedy 2015, Alg. 1 (bn) or
Ioffe 2017, Alg. 1 (renorm: r and d per group against the shared running statistics) to each, then updates the
running statistics once from the groups' mean moments (bnzoo/norms/ghost.py). Every case runs several steps on
drifting batches (so renorm's clips are active) and compares the output, all gradients, the running statistics
and ``num_batches_tracked``: eager, under ``torch.compile(aot_eager)``, in float64, float32 and bf16 autocast,
and on 2 gloo processes under NormSync against one process on the concatenated batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bnzoo.norms import make_norm

C = 5
EPS = 1e-3
STEPS = 3
OPTIONS: dict[str, dict[str, Any]] = {
    "bn": {"eps": EPS, "momentum": 0.3},
    "renorm": {"eps": EPS, "momentum": 0.3, "r_max": 1.5, "d_max": 0.5},
}
# name: (norm layout, input shape, virtual batch size, channels_last)
CASES: dict[str, tuple[str, tuple[int, ...], int, bool]] = {
    "1d_flat": ("1d", (12, C), 3, False),
    "1d_length": ("1d", (8, C, 3), 2, False),
    "2d": ("2d", (8, C, 3, 2), 4, False),
    "2d_channels_last": ("2d", (8, C, 3, 2), 2, True),
    "3d": ("3d", (4, C, 2, 2, 3), 2, False),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16_autocast": torch.bfloat16}
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "bf16_autocast": 4e-2}


class ReferenceGhost:
    """Float64 ghost-batch BatchNorm / Batch Renorm, one group at a time (see the module docstring)."""

    def __init__(self, kind: str, k: int, mean: Tensor, var: Tensor) -> None:
        self.kind, self.k = kind, k
        self.opts = OPTIONS[kind]
        self.mean = mean.double().clone()
        self.var = var.double().clone()  # bn: running variance; renorm: sigma^2 - eps
        self.steps = 0
        self.clipped = 0

    def train_step(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        view = [1, C] + [1] * (x.dim() - 2)
        eps = self.opts["eps"]
        outputs, means, spreads = [], [], []
        sigma = (self.var + eps).sqrt()
        for start in range(0, x.shape[0], self.k):
            group = x[start : start + self.k]
            mu_g = group.mean(dims)
            var_g = ((group - mu_g.view(view)) ** 2).mean(dims)
            sigma_g = (var_g + eps).sqrt()
            x_hat = (group - mu_g.view(view)) / sigma_g.view(view)
            if self.kind == "renorm":
                r_max, d_max = self.opts["r_max"], self.opts["d_max"]
                r = (sigma_g.detach() / sigma).clamp(1 / r_max, r_max)
                d = ((mu_g.detach() - self.mean) / sigma).clamp(-d_max, d_max)
                self.clipped += int(((r - 1).abs() > 1e-12).sum() + (d.abs() > 1e-12).sum())
                x_hat = x_hat * r.view(view) + d.view(view)
                spreads.append(sigma_g.detach())
            else:
                m = group.numel() // C
                spreads.append(var_g.detach() * m / (m - 1))
            means.append(mu_g.detach())
            outputs.append(gamma.view(view) * x_hat + beta.view(view))
        a = self.opts["momentum"]
        self.steps += 1
        mean_mu, mean_spread = torch.stack(means).mean(0), torch.stack(spreads).mean(0)
        self.mean = self.mean + a * (mean_mu - self.mean)
        if self.kind == "renorm":
            self.var = (sigma + a * (mean_spread - sigma)) ** 2 - eps
        else:
            self.var = self.var + a * (mean_spread - self.var)
        return torch.cat(outputs)

    def state(self) -> dict[str, Tensor]:
        return {"running_mean": self.mean, "running_var": self.var, "num_batches_tracked": torch.tensor(self.steps)}


def make_layer(kind: str, layout: str, k: int, dtype: str) -> nn.Module:
    layer = make_norm(kind, C, layout, virtual_batch_size=k, **OPTIONS[kind])
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, C))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return layer.double() if dtype == "float64" else layer


def batch(shape: tuple[int, ...], step: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Input and upstream gradient; the groups differ in mean and scale, and both drift between steps."""
    g = torch.Generator().manual_seed(50 + step)
    view = [1, C] + [1] * (len(shape) - 2)
    mean = torch.linspace(-1.0, 1.0, C, dtype=torch.float64).view(view) * (1 + 2 * step)
    scale = torch.linspace(0.5, 3.0, C, dtype=torch.float64).view(view) * (1 + 0.5 * step)
    per_sample = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64).view(-1, *([1] * (len(shape) - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale * per_sample + mean + per_sample
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), upstream.to(dtype)


def assert_close(got: Tensor, want: Tensor, dtype: str, what: str) -> None:
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16_autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_case(kind: str, case: str, dtype: str, how: str) -> None:
    layout, shape, k, channels_last = CASES[case]
    layer = make_layer(kind, layout, k, dtype)
    ref = ReferenceGhost(kind, k, layer.running_mean, layer.running_var)
    torch._dynamo.reset()
    run = layer if how == "eager" else torch.compile(layer, backend=how)
    for step in range(STEPS):
        x, upstream = batch(shape, step, DTYPES[dtype])
        x_in = x.clone()
        if channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        x_in.requires_grad_()
        layer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            y = run(x_in)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last), "the output left the channels-last format"
        y.backward(upstream.to(y.dtype))
        x64 = x.double().requires_grad_()
        gamma = layer.weight.detach().double().requires_grad_()
        beta = layer.bias.detach().double().requires_grad_()
        y_ref = ref.train_step(x64, gamma, beta)
        grads = torch.autograd.grad(y_ref, [x64, gamma, beta], upstream.double())
        what = f"{kind}/{case}/{dtype}/{how} step {step}"
        assert_close(y.detach(), y_ref.detach(), dtype, f"{what} output")
        got_grads = (x_in.grad, layer.weight.grad, layer.bias.grad)
        for name, got, want in zip(("x", "weight", "bias"), got_grads, grads, strict=True):
            assert_close(got, want, dtype, f"{what} d/d{name}")
    for name, want in ref.state().items():
        got = getattr(layer, name)
        if name == "num_batches_tracked":
            assert int(got) == int(want), f"{kind}/{case}: num_batches_tracked {int(got)} != {int(want)}"
        else:
            assert_close(got, want, "float32" if dtype == "bf16_autocast" else dtype, f"{kind}/{case}/{dtype} {name}")
    if kind == "renorm":
        assert ref.clipped > 0, "r and d must be clipped somewhere, or renorm is only tested as BN"
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_ghost_batches_match_the_float64_reference(kind: str, case: str, dtype: str) -> None:
    run_case(kind, case, dtype, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_compiled_ghost_batches_match_the_float64_reference(kind: str, case: str, dtype: str) -> None:
    run_case(kind, case, dtype, "aot_eager")


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_eval_mode_is_unchanged_by_ghost_batches(kind: str) -> None:
    ghost = make_layer(kind, "2d", 2, "float64").eval()
    plain = make_norm(kind, C, "2d", **OPTIONS[kind]).double().eval()
    with torch.no_grad():
        for layer in (ghost, plain):
            layer.running_mean.copy_(torch.linspace(-1.0, 1.0, C))
            layer.running_var.copy_(torch.linspace(0.5, 2.0, C))
    plain.load_state_dict(ghost.state_dict())  # the same keys as BatchNorm's
    x = torch.randn(6, C, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)
    ghost(torch.randn(5, C, 3, 3, dtype=torch.float64))  # any batch size at inference


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_one_ghost_batch_is_the_plain_layer(kind: str) -> None:
    # virtual_batch_size = N: one group, so exactly the layer without ghost batches
    ghost = make_layer(kind, "2d", 8, "float64")
    plain = make_norm(kind, C, "2d", **OPTIONS[kind]).double()
    plain.load_state_dict(ghost.state_dict())
    for step in range(STEPS):
        x, upstream = batch((8, C, 3, 2), step, torch.float64)
        outs = []
        for layer in (ghost, plain):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            outs.append((y, *torch.autograd.grad(y, [xi, layer.weight, layer.bias], upstream)))
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[name], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_batch_not_divisible_names_both_numbers(kind: str) -> None:
    layer = make_norm(kind, C, "2d", virtual_batch_size=4)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match="batch size 6 is not divisible by virtual_batch_size 4"):
        layer(torch.randn(6, C, 2, 2))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a rejected batch"


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_single_value_groups_are_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="virtual_batch_size 1 leaves 1 value per channel"):
        make_norm(kind, C, "1d", virtual_batch_size=1)(torch.randn(4, C))


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "4"])
def test_bad_virtual_batch_size_is_named(value: Any) -> None:
    with pytest.raises(ValueError, match=f"virtual_batch_size must be a positive int.*got {value!r}"):
        make_norm("bn", C, "2d", virtual_batch_size=value)


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_sequence_layout_is_refused_by_name(kind: str) -> None:
    with pytest.raises(ValueError, match="virtual_batch_size is not supported for the 'seq' layout"):
        make_norm(kind, C, "seq", virtual_batch_size=4)


@pytest.mark.parametrize("kind", ["gn", "ln", "frozen", "none"])
def test_other_kinds_do_not_take_the_option(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown option\\(s\\) virtual_batch_size"):
        make_norm(kind, C, "2d", virtual_batch_size=4)


def test_models_take_it_through_norm_options() -> None:
    from bnzoo import create_model

    model = create_model("resnet20", norm="renorm", norm_options={"virtual_batch_size": 4}, num_classes=10)
    ghosts = [m for m in model.modules() if getattr(m, "virtual_batch_size", None) == 4]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert ghosts and len(ghosts) == len(norms)
    model.train()(torch.randn(8, 3, 32, 32)).sum().backward()
    with pytest.raises(ValueError, match="batch size 6 is not divisible by virtual_batch_size 4"):
        model(torch.randn(6, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------
# NormSync: groups per process, running statistics averaged over every process's groups

SHARDS = (4, 8)  # unequal shards, each a multiple of the virtual batch size


def _sync_worker(rank: int, world_size: int, kinds: list[str]) -> list[dict]:
    from bnzoo.plugins import convert_sync_norms

    results = []
    for kind in kinds:
        layer = convert_sync_norms(make_layer(kind, "2d", 4, "float64"))
        start = sum(SHARDS[:rank])
        steps = []
        for step in range(STEPS):
            x, upstream = batch((sum(SHARDS), C, 3, 2), step, torch.float64)
            xi = x[start : start + SHARDS[rank]].clone().requires_grad_()
            y = layer(xi)
            grads = torch.autograd.grad(y, [xi, layer.weight, layer.bias], upstream[start : start + SHARDS[rank]])
            steps.append({"y": y.detach(), "x_grad": grads[0], "weight_grad": grads[1], "bias_grad": grads[2]})
        results.append({"steps": steps, "state": {k: v.clone() for k, v in layer.state_dict().items()}})
    return results


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_norm_sync_ghost_batches_equal_one_process_on_the_whole_batch(tmp_path: Any) -> None:
    from tests.distributed import run_in_processes

    kinds = ["bn", "renorm"]
    per_rank = run_in_processes(_sync_worker, 2, tmp_path, kinds)
    for index, kind in enumerate(kinds):
        layer = make_layer(kind, "2d", 4, "float64")
        for step in range(STEPS):
            x, upstream = batch((sum(SHARDS), C, 3, 2), step, torch.float64)
            xi = x.clone().requires_grad_()
            y = layer(xi)
            grads = torch.autograd.grad(y, [xi, layer.weight, layer.bias], upstream)
            want = dict(zip(("x_grad", "weight_grad", "bias_grad"), grads, strict=True))
            shards = [per_rank[r][index]["steps"][step] for r in range(2)]
            assert_close(torch.cat([s["y"] for s in shards]), y.detach(), "float64", f"{kind} step {step} y")
            assert_close(torch.cat([s["x_grad"] for s in shards]), want["x_grad"], "float64", f"{kind} x_grad")
            for key in ("weight_grad", "bias_grad"):  # each process holds its loss term's gradient; DDP sums them
                assert_close(sum(s[key] for s in shards), want[key], "float64", f"{kind} step {step} {key}")
        for r in range(2):
            for name, value in layer.state_dict().items():
                assert_close(per_rank[r][index]["state"][name], value, "float64", f"{kind} rank {r} {name}")
