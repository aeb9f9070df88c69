"""Forward + backward time of bnzoo's Batch Renorm against torch's BatchNorm and a naive renorm.

The naive renorm is written in plain tensor ops, as community implementations do. Ratios are to ``bn``
measured in the same run, per shape. Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.norms            # CPU table
    .venv/bin/python -m benchmarks.norms --device cuda                # on a GPU machine
    .venv/bin/python -m benchmarks.norms --quick                      # smoke run

Each shape is timed in float32 and in bf16 autocast (``--dtypes``): under autocast a norm receives the bf16
output of the convolution or linear layer before it, with float32 parameters and running statistics, so the
bf16 rows feed a bf16 input (and a bf16 upstream gradient) to every candidate inside ``torch.autocast``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import Tensor, nn

from benchmarks.timing import compare, format_table, machine_line
from bnzoo.norms import make_norm

SHAPES: list[tuple[int, ...]] = [
    (128, 16, 32, 32),  # CIFAR ResNet-20, batch 128, stage 1
    (128, 32, 16, 16),  # stage 2
    (128, 64, 8, 8),  # stage 3
    (128, 16, 28, 28),  # Fashion-MNIST ResNet-20, stage 1
    (128, 64, 7, 7),  # Fashion-MNIST ResNet-20, stage 3
    (32, 64, 56, 56),  # ImageNet ResNet, batch 32, stage 1
    (32, 256, 14, 14),  # ImageNet ResNet, batch 32, stage 3
    (256, 1024),  # a wide fully connected layer
]


class NaiveBatchRenorm2d(nn.Module):
    """Batch Renorm (Ioffe 2017, Alg. 1) in plain tensor ops, the way most public implementations write it."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, r_max: float = 3.0, d_max: float = 5.0
    ) -> None:
        super().__init__()
        self.eps, self.momentum, self.r_max, self.d_max = eps, momentum, r_max, d_max
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims)
        std = (x.var(dims, unbiased=False) + self.eps).sqrt()
        r = (std.detach() / self.running_std).clamp(1 / self.r_max, self.r_max)
        d = ((mean.detach() - self.running_mean) / self.running_std).clamp(-self.d_max, self.d_max)
        x_hat = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
        with torch.no_grad():
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            self.running_std += self.momentum * (std.detach() - self.running_std)
        return self.weight.view(shape) * x_hat + self.bias.view(shape)


DTYPES = ("float32", "bf16")


def _step(layer: nn.Module, x: Tensor, upstream: Tensor, device: str, dtype: str):
    def run() -> None:
        x.grad = None
        context = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with context:
            out = layer(x)
        out.backward(upstream)

    return run


def benchmark(
    shapes: list[tuple[int, ...]], device: str, rounds: int, dtypes: tuple[str, ...] = DTYPES
) -> list[dict[str, object]]:
    rows = []
    for dtype in dtypes:
        rows += [_benchmark_shape(shape, device, rounds, dtype) for shape in shapes]
    return rows


def _benchmark_shape(shape: tuple[int, ...], device: str, rounds: int, dtype: str) -> dict[str, object]:
    channels = shape[1]
    layout = "1d" if len(shape) == 2 else "2d"
    data_type = torch.bfloat16 if dtype == "bf16" else torch.float32
    x = (torch.randn(shape, device=device) * 2 + 1).to(data_type).requires_grad_()
    upstream = torch.randn(shape, device=device, dtype=data_type)
    layers = {
        "bn": make_norm("bn", channels, layout),
        "renorm": make_norm("renorm", channels, layout),
        "naive renorm": NaiveBatchRenorm2d(channels),
    }
    candidates = {name: _step(layer.to(device).train(), x, upstream, device, dtype) for name, layer in layers.items()}
    if device == "cuda":
        candidates = {name: _synchronized(fn) for name, fn in candidates.items()}
    times = compare(candidates, rounds=rounds)
    return {
        "dtype": dtype,
        "shape": "x".join(map(str, shape)),
        "bn ms": times["bn"] * 1e3,
        "renorm ms": times["renorm"] * 1e3,
        "renorm / bn": times["renorm"] / times["bn"],
        "naive / bn": times["naive renorm"] / times["bn"],
    }


def _synchronized(fn):
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="two small shapes, few rounds")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape (default 15)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="float32 and/or bf16 (autocast)"
    )
    args = parser.parse_args()
    shapes = [(16, 8, 8, 8), (64, 32)] if args.quick else SHAPES
    rows = benchmark(shapes, args.device, rounds=3 if args.quick else args.rounds, dtypes=tuple(args.dtypes))
    print(f"Forward + backward, training mode, {args.device}: {machine_line()}")
    print(format_table(rows, ["dtype", "shape", "bn ms", "renorm ms", "renorm / bn", "naive / bn"]))
    for dtype in args.dtypes:
        worst = max(float(r["renorm / bn"]) for r in rows if r["dtype"] == dtype)  # type: ignore[arg-type]
        print(f"worst renorm / bn, {dtype}: {worst:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
