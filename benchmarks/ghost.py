"""Forward + backward time of ghost batches (``virtual_batch_size=k``) against BatchNorm on the same batch.

Candidates, per shape of :data:`benchmarks.norms.SHAPES` (the one shape list of the norm benchmarks) and per
virtual batch size k (only k < N: k = N is plain BatchNorm):

* ``bn``: ``make_norm("bn", C)``, statistics over the whole batch (the baseline of every ratio);
* ``ghost bn``: ``make_norm("bn", C, virtual_batch_size=k)`` (:mod:`bnzoo.norms.ghost`: one regrouping copy,
  then BatchNorm's native kernel over (group, channel) pairs);
* ``ghost renorm``: ``make_norm("renorm", C, virtual_batch_size=k)``;
* ``chunked``: ``torch.cat([bn(c) for c in x.chunk(N // k)])``, the way Hoffer et al. 2017's code and most
  public ghost-batch implementations write it (for context).

Ratios are to ``bn`` measured in the same run (interleaved rounds, :func:`benchmarks.timing.compare`). Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.ghost             # CPU table
    .venv/bin/python -m benchmarks.ghost --device cuda                 # on a GPU machine
    .venv/bin/python -m benchmarks.ghost --quick                       # smoke run
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.ghost --profile   # where the time goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.norms import SHAPES
from benchmarks.timing import compare, format_table, machine_line
from bnzoo.norms import make_norm

#: Ioffe 2017's micro-batches of 4 (Sec. 4.3) and Hoffer et al. 2017's ghost batches of 32 (Sec. 4)
VIRTUAL_BATCH_SIZES: tuple[int, ...] = (4, 32)
TARGET = 1.3


class ChunkedGhostBatchNorm(nn.Module):
    """Ghost batches as ``x.chunk(G)``, one BatchNorm call per chunk, ``torch.cat`` (Hoffer et al.'s code)."""

    def __init__(self, num_features: int, virtual_batch_size: int, layout: str) -> None:
        super().__init__()
        self.bn = make_norm("bn", num_features, layout)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.bn(chunk) for chunk in x.chunk(x.shape[0] // self.virtual_batch_size)])


def _step(layer: nn.Module, x: Tensor, upstream: Tensor, synchronize: bool):
    def run() -> None:
        x.grad = None
        layer(x).backward(upstream)
        if synchronize:
            torch.cuda.synchronize()

    return run


def benchmark_shape(
    shape: tuple[int, ...], k: int, device: str, rounds: int, clock: Callable[[], float] | None = None
) -> dict[str, object]:
    """One row: the four candidates on one (N, C, *) shape with ghost batches of ``k`` samples."""
    channels = shape[1]
    layout = "1d" if len(shape) == 2 else "2d"
    x = (torch.randn(shape, device=device) * 2 + 1).requires_grad_()
    upstream = torch.randn(shape, device=device)
    layers = {
        "bn": make_norm("bn", channels, layout),
        "ghost bn": make_norm("bn", channels, layout, virtual_batch_size=k),
        "ghost renorm": make_norm("renorm", channels, layout, virtual_batch_size=k),
        "chunked": ChunkedGhostBatchNorm(channels, k, layout),
    }
    synchronize = device.startswith("cuda")
    candidates = {name: _step(layer.to(device).train(), x, upstream, synchronize) for name, layer in layers.items()}
    times = compare(candidates, rounds=rounds, clock=clock)
    return {
        "shape": "x".join(map(str, shape)),
        "k": k,
        "bn ms": times["bn"] * 1e3,
        "ghost bn ms": times["ghost bn"] * 1e3,
        "ghost bn / bn": times["ghost bn"] / times["bn"],
        "ghost renorm / bn": times["ghost renorm"] / times["bn"],
        "chunked / bn": times["chunked"] / times["bn"],
    }


def benchmark(
    shapes: list[tuple[int, ...]],
    sizes: tuple[int, ...],
    device: str,
    rounds: int,
    clock: Callable[[], float] | None = None,
) -> list[dict[str, object]]:
    return [benchmark_shape(shape, k, device, rounds, clock) for shape in shapes for k in sizes if k < shape[0]]


def profile_rows(shape: tuple[int, ...], k: int, steps: int = 20) -> list[dict[str, object]]:
    """Where the time of ``bn`` and ``ghost bn`` goes on one shape: the share of each op's self CPU time."""
    from torch.profiler import profile

    channels, layout = shape[1], "1d" if len(shape) == 2 else "2d"
    x = (torch.randn(shape) * 2 + 1).requires_grad_()
    upstream = torch.randn(shape)
    rows = []
    for name, options in (("bn", {}), ("ghost bn", {"virtual_batch_size": k})):
        step = _step(make_norm("bn", channels, layout, **options).train(), x, upstream, False)
        for _ in range(3):
            step()
        with profile() as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
            share = event.self_cpu_time_total / total
            rows.append({"candidate": name, "op": event.key, "calls/step": event.count // steps, "share": share})
    return rows


COLUMNS = ["shape", "k", "bn ms", "ghost bn ms", "ghost bn / bn", "ghost renorm / bn", "chunked / bn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="two small shapes, few rounds")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU seconds of the process, not wall time (a loaded shared machine; one thread, CPU only)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row (default 15)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(VIRTUAL_BATCH_SIZES), help="virtual batch sizes k (4 32)"
    )
    parser.add_argument("--profile", action="store_true", help="op breakdown of bn and ghost bn on two shapes")
    args = parser.parse_args()
    if args.profile:
        for shape in ((128, 16, 32, 32), (256, 1024)):
            print(f"torch.profiler, {'x'.join(map(str, shape))}, k=4, self CPU time: {machine_line()}")
            print(format_table(profile_rows(shape, 4), ["candidate", "op", "calls/step", "share"]))
        return
    shapes = [(16, 8, 8, 8), (64, 32)] if args.quick else SHAPES
    sizes = (4,) if args.quick else tuple(args.sizes)
    if args.cpu_time:  # one clock for the timings and the machine line
        os.environ["BNZOO_BENCH_CLOCK"] = "thread"
    clock = None
    rows = benchmark(shapes, sizes, args.device, rounds=3 if args.quick else args.rounds, clock=clock)
    timed = "CPU time" if args.cpu_time else "wall time"
    print(f"Forward + backward, training mode, float32, {args.device}, {timed}: {machine_line()}")
    print(format_table(rows, COLUMNS))
    for column in ("ghost bn / bn", "ghost renorm / bn"):
        worst = max(float(row[column]) for row in rows)  # type: ignore[arg-type]
        print(f"worst {column}: {worst:.3f} (target <= {TARGET})")


if __name__ == "__main__":
    main()
