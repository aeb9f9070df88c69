"""Every path through every built-in norm kind against its float64 reference (tests/norm_reference.py).

The matrix: kind (``BUILTIN_NORMS``) x layout (1d flat and (N, C, L), 2d contiguous and channels_last, 3d, and
sequences: all steps valid, lengths, a mask with holes, a PackedSequence) x mode (train, eval) x execution
(eager; ``torch.compile`` with ``aot_eager``; inductor where a C++ compiler is present) x dtype (float64,
float32, bfloat16 inputs under CPU autocast). Each case runs several steps on drifting batches (so that Batch
Renorm's clips of r and d are active) and compares the output, *every* gradient (input, weight, bias) and,
after the steps, the running statistics and ``num_batches_tracked``.

Eager runs the whole matrix. Compilation costs seconds a case, so ``aot_eager`` runs every kind x layout x
mode in float32 and a subset in float64 and bfloat16, and inductor one representative of each kind plus every
layout of the kinds with their own training kernels (bn, renorm). Double backward (gradient penalties) is
checked against the same references, eagerly: ``torch.compile`` refuses it itself.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnzoo.norms import BUILTIN_NORMS, make_norm
from tests.norm_reference import (
    ReferenceBatchNorm,
    ReferenceFrozen,
    ReferenceGroupNorm,
    ReferenceIdentity,
    ReferenceLayerNorm,
    ReferenceRenorm,
)

CHANNELS = 6
EPS = 1e-3
STEPS = 3
OPTIONS: dict[str, dict[str, Any]] = {
    "bn": {"eps": EPS, "momentum": 0.3},
    "renorm": {"eps": EPS, "momentum": 0.3, "r_max": 1.5, "d_max": 0.5},
    "gn": {"eps": EPS},
    "ln": {"eps": EPS},
    "frozen": {"eps": EPS},
    "none": {},
}
HAS_CXX = shutil.which("g++") is not None or shutil.which("clang++") is not None


@dataclass(frozen=True)
class Layout:
    norm_layout: str
    shape: tuple[int, ...]
    channels_last: bool = False
    steps: str | None = None  # sequences: None (every step valid), "lengths", "mask" or "packed"

    @property
    def is_seq(self) -> bool:
        return self.norm_layout == "seq"


LAYOUTS: dict[str, Layout] = {
    "1d_flat": Layout("1d", (12, CHANNELS)),
    "1d_length": Layout("1d", (5, CHANNELS, 4)),
    "2d": Layout("2d", (4, CHANNELS, 3, 5)),
    "2d_channels_last": Layout("2d", (4, CHANNELS, 3, 5), channels_last=True),
    "3d": Layout("3d", (3, CHANNELS, 2, 3, 2)),
    "seq_all_valid": Layout("seq", (4, 5, CHANNELS)),
    "seq_lengths": Layout("seq", (5, 6, CHANNELS), steps="lengths"),
    "seq_mask": Layout("seq", (5, 6, CHANNELS), steps="mask"),
    "seq_packed": Layout("seq", (5, 6, CHANNELS), steps="packed"),
}
LENGTHS = torch.tensor([6, 3, 1, 5, 2])
HOLES = torch.tensor(
    [
        [1, 0, 1, 1, 0, 1],
        [0, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0, 1],
    ],
    dtype=torch.bool,
)

# dtype of the inputs; bfloat16 runs under torch.autocast("cpu", torch.bfloat16) with float32 parameters
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16_autocast": torch.bfloat16}
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "bf16_autocast": 4e-2}


# ----------------------------------------------------------------------------------------------------------
# Layers, references, data


def make_layer(kind: str, layout: Layout, dtype: str) -> nn.Module:
    """The layer with non-trivial affine parameters (and, for ``frozen``, statistics)."""
    layer = make_norm(kind, CHANNELS, layout.norm_layout, **OPTIONS[kind])
    with torch.no_grad():
        for name, value in (
            ("weight", torch.linspace(0.5, 2.0, CHANNELS)),
            ("bias", torch.linspace(-1.0, 1.0, CHANNELS)),
        ):
            if isinstance(getattr(layer, name, None), Tensor):
                getattr(layer, name).copy_(value)
        if kind == "frozen":
            layer.running_mean.copy_(torch.linspace(-2.0, 2.0, CHANNELS))
            layer.running_var.copy_(torch.linspace(0.3, 4.0, CHANNELS))
    return layer.double() if dtype == "float64" else layer


def set_running_stats(layer: nn.Module) -> None:
    """Non-trivial running statistics, for eval mode."""
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1.0, 3.0, CHANNELS))
        layer.running_var.copy_(torch.linspace(0.2, 5.0, CHANNELS))


def make_reference(kind: str, layer: nn.Module) -> Any:
    """The float64 reference of ``layer``, starting from its current state."""
    opts = OPTIONS[kind]
    if kind == "bn":
        ref = ReferenceBatchNorm(CHANNELS, EPS, opts["momentum"])
        ref.mean, ref.var = layer.running_mean.double().clone(), layer.running_var.double().clone()
        return ref
    if kind == "renorm":
        ref = ReferenceRenorm(CHANNELS, EPS, opts["momentum"], opts["r_max"], opts["d_max"])
        ref.mu = layer.running_mean.double().clone()
        ref.sigma = (layer.running_var.double() + EPS).sqrt()
        return ref
    if kind == "gn":
        return ReferenceGroupNorm(layer.num_groups, EPS)
    if kind == "ln":
        return ReferenceLayerNorm(EPS)
    if kind == "frozen":
        tensors = (layer.weight, layer.bias, layer.running_mean, layer.running_var)
        return ReferenceFrozen(*(t.double().clone() for t in tensors), EPS)
    return ReferenceIdentity()


def learned(layer: nn.Module, name: str) -> Tensor | None:
    value = getattr(layer, name, None)
    return value if isinstance(value, nn.Parameter) else None


def valid_steps(layout: Layout) -> Tensor | None:
    """(B, T) mask of the valid steps of a sequence layout; None for the others."""
    if not layout.is_seq:
        return None
    batch, steps, _ = layout.shape
    if layout.steps == "mask":
        return HOLES
    if layout.steps in ("lengths", "packed"):
        return torch.arange(steps).unsqueeze(0) < LENGTHS.unsqueeze(1)
    return torch.ones(batch, steps, dtype=torch.bool)


def batch(layout: Layout, step: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Input and upstream gradient of one step, in ``dtype``. Per-channel means and scales drift from step to
    step, so the running statistics lag behind and Batch Renorm's r and d are clipped."""
    g = torch.Generator().manual_seed(1000 + step)
    channel_dim = -1 if layout.is_seq else 1
    view = [1] * len(layout.shape)
    view[channel_dim] = CHANNELS
    mean = torch.linspace(-1.0, 1.0, CHANNELS, dtype=torch.float64).view(view) * (1 + 2 * step)
    scale = torch.linspace(0.5, 3.0, CHANNELS, dtype=torch.float64).view(view) * (1 + 0.5 * step)
    x = torch.randn(layout.shape, generator=g, dtype=torch.float64) * scale + mean
    upstream = torch.randn(layout.shape, generator=g, dtype=torch.float64)
    return x.to(dtype), upstream.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# One step of the layer, and of its reference


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16_autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward(run: Any, layout: Layout, x: Tensor) -> Tensor:
    """The layer's output for input ``x``, padded to ``x``'s shape for sequences."""
    valid = valid_steps(layout)
    if layout.steps == "lengths":
        return run(x, lengths=valid.sum(1))
    if layout.steps == "mask":
        return run(x, mask=valid)
    if layout.steps == "packed":
        packed = pack_padded_sequence(x, valid.sum(1), batch_first=True, enforce_sorted=False)
        padded, _ = pad_packed_sequence(run(packed), batch_first=True, total_length=x.shape[1])
        return padded
    return run(x)


def layer_step(run: Any, layer: nn.Module, layout: Layout, x: Tensor, upstream: Tensor, dtype: str) -> dict:
    x = x.clone()
    if layout.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    layer.zero_grad(set_to_none=True)
    with _autocast(dtype):
        y = forward(run, layout, x)
    y.backward(upstream.to(y.dtype))
    out = {"y": y.detach().double(), "x_grad": x.grad.double()}
    for name in ("weight", "bias"):
        if learned(layer, name) is not None:
            out[f"{name}_grad"] = getattr(layer, name).grad.double()
    return out


def reference_forward(ref: Any, layout: Layout, x: Tensor, gamma: Tensor | None, beta: Tensor | None, train: bool):
    """The reference's output for the float64 leaf ``x``: on the valid steps' rows (M, C) for sequences."""
    apply = ref.train_step if train else ref.infer
    valid = valid_steps(layout)
    if valid is None:
        return apply(x, gamma, beta)
    rows = apply(x[valid], gamma, beta)
    return x.new_zeros(x.shape).index_put((valid,), rows)


def reference_step(ref: Any, layer: nn.Module, layout: Layout, x: Tensor, upstream: Tensor, train: bool) -> dict:
    x = x.double().requires_grad_()
    params = {name: learned(layer, name) for name in ("weight", "bias")}
    leaves = {name: p.detach().double().requires_grad_() for name, p in params.items() if p is not None}
    y = reference_forward(ref, layout, x, leaves.get("weight"), leaves.get("bias"), train)
    grads = torch.autograd.grad(y, [x, *leaves.values()], upstream.double())
    out = {"y": y.detach(), "x_grad": grads[0]}
    out.update({f"{name}_grad": g for name, g in zip(leaves, grads[1:], strict=True)})
    return out


def assert_close(got: Tensor, want: Tensor, dtype: str, what: str) -> None:
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def check_buffers(layer: nn.Module, ref: Any, dtype: str, what: str) -> None:
    for name, want in ref.state().items():
        got = getattr(layer, name)
        if name == "num_batches_tracked":
            assert int(got) == int(want), f"{what}: num_batches_tracked {int(got)} != {int(want)}"
        else:
            # the running statistics are float32 for bfloat16 inputs: compare at float32's tolerance
            assert_close(got, want, "float32" if dtype == "bf16_autocast" else dtype, f"{what}: {name}")


@contextlib.contextmanager
def execution(layer: nn.Module, how: str) -> Iterator[Any]:
    """``layer`` itself (eager) or compiled with the ``how`` backend; checks that compilation took place
    (except for ``none``: an identity has no graph to compile)."""
    if how == "eager":
        yield layer
        return
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(how)
    yield torch.compile(layer, backend=counter)
    assert counter.frame_count >= 1 or not list(layer.state_dict()), f"torch.compile({how}) compiled nothing"
    torch._dynamo.reset()


def check_path(kind: str, layout_name: str, mode: str, how: str, dtype: str) -> None:
    layout = LAYOUTS[layout_name]
    layer = make_layer(kind, layout, dtype)
    train = mode == "train"
    if not train:
        if kind in ("bn", "renorm"):
            set_running_stats(layer)
        layer.eval()
    ref = make_reference(kind, layer)
    clipped = 0
    with execution(layer, how) as run:
        for step in range(STEPS):
            x, upstream = batch(layout, step, DTYPES[dtype])
            got = layer_step(run, layer, layout, x, upstream, dtype)
            want = reference_step(ref, layer, layout, x, upstream, train)
            assert set(got) == set(want)
            for key in want:
                assert_close(got[key], want[key], dtype, f"{kind}/{layout_name}/{mode}/{how}/{dtype} step {step} {key}")
            if kind == "renorm" and train:
                clipped += int(((ref.r - 1).abs() > 1e-12).sum() + (ref.d.abs() > 1e-12).sum())
    check_buffers(layer, ref, dtype, f"{kind}/{layout_name}/{mode}/{how}/{dtype}")
    if kind == "renorm" and train:
        assert clipped > 0, "r and d must differ from 1 and 0 somewhere, or renorm is only tested as BN"


# ----------------------------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("kind", BUILTIN_NORMS)
def test_eager(kind: str, layout_name: str, mode: str, dtype: str) -> None:
    check_path(kind, layout_name, mode, "eager", dtype)


AOT_CASES = [(k, la, m, "float32") for k in BUILTIN_NORMS for la in LAYOUTS for m in ("train", "eval")] + [
    (k, la, "train", d)
    for k in BUILTIN_NORMS
    for la in ("2d_channels_last", "seq_lengths")
    for d in ("float64", "bf16_autocast")
]

# torch.compile cannot trace the boolean-mask gather/scatter of a masked sequence (data-dependent shapes): dynamo
# runs that part eagerly, after AOTAutograd's failed attempt warns "Error detected in IndexPutBackward0"
COMPILE_FALLBACK_WARNING = "ignore:Error detected in IndexPutBackward0:UserWarning"


@pytest.mark.slow
@pytest.mark.filterwarnings(COMPILE_FALLBACK_WARNING)
@pytest.mark.parametrize(("kind", "layout_name", "mode", "dtype"), AOT_CASES)
def test_compiled_aot_eager(kind: str, layout_name: str, mode: str, dtype: str) -> None:
    check_path(kind, layout_name, mode, "aot_eager", dtype)


INDUCTOR_CASES = (
    [("bn", la, "train") for la in LAYOUTS if not la.startswith("seq_")]
    + [("renorm", la, "train") for la in LAYOUTS if not la.startswith("seq_")]
    + [(k, "2d", "train") for k in BUILTIN_NORMS if k not in ("bn", "renorm")]
    + [("renorm", "seq_lengths", "train"), ("renorm", "2d", "eval")]
)


@pytest.mark.slow
@pytest.mark.filterwarnings(COMPILE_FALLBACK_WARNING)
@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler (g++ or clang++) on the CPU")
@pytest.mark.parametrize(("kind", "layout_name", "mode"), INDUCTOR_CASES)
def test_compiled_inductor(kind: str, layout_name: str, mode: str) -> None:
    check_path(kind, layout_name, mode, "inductor", "float32")


# ----------------------------------------------------------------------------------------------------------
# Double backward (gradient penalties)


def penalty(y: Tensor, x: Tensor, upstream: Tensor) -> Tensor:
    """``sum(y * u) + |d sum(y * u) / dx|^2``: a gradient penalty, whose gradient needs second derivatives."""
    loss = (y * upstream).sum()
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + grad.square().sum()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("kind", BUILTIN_NORMS)
def test_double_backward_matches_reference(kind: str, layout_name: str, mode: str) -> None:
    layout = LAYOUTS[layout_name]
    layer = make_layer(kind, layout, "float64")
    train = mode == "train"
    if not train:
        if kind in ("bn", "renorm"):
            set_running_stats(layer)
        layer.eval()
    ref = make_reference(kind, layer)
    params = [p for p in (learned(layer, "weight"), learned(layer, "bias")) if p is not None]
    for step in range(2):
        x64, upstream = batch(layout, step, torch.float64)
        x = x64.clone().requires_grad_()
        got = torch.autograd.grad(penalty(forward(layer, layout, x), x, upstream), [x, *params], allow_unused=True)
        x_ref = x64.clone().requires_grad_()
        leaves = [p.detach().clone().requires_grad_() for p in params]
        named = dict(zip([n for n in ("weight", "bias") if learned(layer, n) is not None], leaves, strict=True))
        y_ref = reference_forward(ref, layout, x_ref, named.get("weight"), named.get("bias"), train)
        want = torch.autograd.grad(penalty(y_ref, x_ref, upstream), [x_ref, *leaves], allow_unused=True)
        for name, g, w in zip(["x", *named], got, want, strict=True):
            g = torch.zeros_like(w) if g is None and w is not None else g
            w = torch.zeros_like(g) if w is None and g is not None else w
            assert_close(g, w, "float64", f"{kind}/{layout_name}/{mode} step {step}: d penalty / d {name}")


@pytest.mark.parametrize(
    ("shape", "torch_bn"),
    [
        ((12, 5), nn.BatchNorm1d),
        ((6, 5, 4), nn.BatchNorm1d),
        ((4, 5, 3, 3), nn.BatchNorm2d),
        ((3, 5, 2, 3, 2), nn.BatchNorm3d),
    ],
)
def test_unclipped_renorm_double_backward_is_batchnorms(shape: tuple[int, ...], torch_bn: type[nn.Module]) -> None:
    # r_max = 1, d_max = 0 make Batch Renorm BatchNorm (Ioffe 2017, Sec. 3): second derivatives included
    layouts = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}
    renorm = make_norm("renorm", 5, layouts[len(shape)], r_max=1.0, d_max=0.0).double()
    bn = torch_bn(5).double()
    with torch.no_grad():
        for layer in (renorm, bn):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, 5))
    x64 = torch.randn(shape, dtype=torch.float64) * 2 + 1
    upstream = torch.randn(shape, dtype=torch.float64)
    grads = []
    for layer in (renorm, bn):
        x = x64.clone().requires_grad_()
        grads.append(torch.autograd.grad(penalty(layer(x), x, upstream), [x, layer.weight, layer.bias]))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_compiled_double_backward_is_refused_by_torch(kind: str) -> None:
    # documented rather than silently wrong: AOTAutograd itself refuses create_graph through a compiled graph
    torch._dynamo.reset()
    layer = torch.compile(make_norm(kind, 4, "2d"), backend="aot_eager")
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        penalty(layer(x), x, torch.randn(4, 4, 3, 3)).backward()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: named errors before any kernel


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout_name", ["1d_flat", "1d_length", "2d", "3d"])
@pytest.mark.parametrize("kind", ["bn", "renorm", "frozen", "ln"])
def test_wrong_channel_count_is_named(kind: str, layout_name: str, mode: str) -> None:
    # renorm's training path used to hand such an input to the native statistics kernel, which read and wrote
    # past the running buffers; torch's BatchNorm counted the rejected batch in num_batches_tracked
    layout = LAYOUTS[layout_name]
    layer = make_layer(kind, layout, "float32").train(mode == "train")
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    wrong = (layout.shape[0], CHANNELS + 2, *layout.shape[2:])
    with pytest.raises(ValueError, match=re.escape(f"expects an input of shape (N, {CHANNELS}, *), got {wrong}")):
        layer(torch.randn(wrong))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a rejected input"


# ----------------------------------------------------------------------------------------------------------
# Synchronized norms (NormSync) on 2 gloo processes with unequal shards: eager, compiled, double backward

SYNC_SHARDS = {"1d_flat": (5, 7), "2d": (1, 3), "2d_channels_last": (3, 1), "seq_lengths": (2, 3)}
SYNC_CASES = [
    (kind, layout_name, how, double)
    for kind in ("bn", "renorm")
    for layout_name in SYNC_SHARDS
    for how, double in (("eager", False), ("aot_eager", False), ("eager", True))
]


def shard_rows(layout: Layout, rank: int) -> slice:
    sizes = SYNC_SHARDS[next(name for name, la in LAYOUTS.items() if la == layout)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def sync_step(run: Any, layer: nn.Module, layout: Layout, rank: int | None, step: int, double: bool) -> dict:
    """One step on the whole batch (rank None: the reference) or on ``rank``'s shard of it."""
    x64, upstream = batch(layout, step, torch.float64 if double else torch.float32)
    valid = valid_steps(layout)
    rows = slice(None) if rank is None else shard_rows(layout, rank)
    x = x64[rows].clone()
    if layout.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = run(x, lengths=valid[rows].sum(1)) if layout.steps == "lengths" else run(x)
    loss = penalty(y, x, upstream[rows]) if double else (y * upstream[rows]).sum()
    params = [layer.weight, layer.bias]
    grads = torch.autograd.grad(loss, [x, *params])
    return {"y": y.detach(), "x_grad": grads[0], "weight_grad": grads[1], "bias_grad": grads[2]}


def _sync_worker(rank: int, world_size: int, cases: list) -> list[dict]:
    from bnzoo.plugins import convert_sync_norms

    results = []
    for kind, layout_name, how, double in cases:
        layout = LAYOUTS[layout_name]
        layer = convert_sync_norms(make_layer(kind, layout, "float64" if double else "float32"))
        with execution(layer, how) as run:
            steps = [sync_step(run, layer, layout, rank, step, double) for step in range(STEPS)]
        results.append({"steps": steps, "state": {k: v.clone() for k, v in layer.state_dict().items()}})
    return results


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_synchronized_norms_compiled_and_double_backward_equal_one_process(tmp_path: Any) -> None:
    """NormSync's global moments, eager and under aot_eager (whose backward used to recompute the shift of the
    synchronized moments from the updated running mean: input gradients up to 0.2 off), and with a gradient
    penalty (second derivatives through the all-reduce), equal one process on the concatenated batch."""
    from tests.distributed import run_in_processes

    per_rank = run_in_processes(_sync_worker, 2, tmp_path, SYNC_CASES)
    for index, (kind, layout_name, how, double) in enumerate(SYNC_CASES):
        layout = LAYOUTS[layout_name]
        dtype = "float64" if double else "float32"
        layer = make_layer(kind, layout, dtype)
        what = f"{kind}/{layout_name}/{how}{' double backward' if double else ''}"
        for step in range(STEPS):
            want = sync_step(layer, layer, layout, None, step, double)
            shards = [per_rank[r][index]["steps"][step] for r in range(2)]
            for key in ("y", "x_grad"):
                assert_close(torch.cat([s[key] for s in shards]), want[key], dtype, f"{what} step {step} {key}")
            for key in ("weight_grad", "bias_grad"):  # each process holds its loss term's gradient; DDP sums them
                assert_close(sum(s[key] for s in shards), want[key], dtype, f"{what} step {step} {key}")
        for r in range(2):
            for name, value in layer.state_dict().items():
                assert_close(per_rank[r][index]["state"][name], value, dtype, f"{what} rank {r} {name}")
