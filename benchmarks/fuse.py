"""Eval throughput of a network with its norms folded into the convolutions (``bnzoo.norms.fuse_norms``)
against the same network unfused, for ResNet-20 and BN-Inception, in one run.

Each model is built with ``norm="bn"`` and random running statistics, put in eval mode and folded; both are
timed on the same batch under ``torch.inference_mode`` in interleaved rounds (:func:`benchmarks.timing.compare`),
in the contiguous and the channels-last memory format (the tasks' default). The ratio is fused / unfused time of
the same run (below 1: the fused network is faster). Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.fuse             # the table
    .venv/bin/python -m benchmarks.fuse --device cuda                 # on a GPU machine
    .venv/bin/python -m benchmarks.fuse --quick                       # smoke run
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.timing import compare, format_table, machine_line
from bnzoo import create_model
from bnzoo.norms import fold_norms

#: (model, batch, input channels, image size): CIFAR-sized inputs, batch 128 as in training
WORKLOADS: list[tuple[str, int, int, int]] = [
    ("resnet20", 128, 3, 32),
    ("bn_inception_small", 128, 3, 32),
]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _random_statistics_(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(getattr(layer, "running_mean", None), Tensor):
                layer.running_mean.normal_(0, 0.5)
                layer.running_var.uniform_(0.5, 2.0)


def _forward(model: nn.Module, x: Tensor, synchronize: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
        if synchronize:
            torch.cuda.synchronize()

    return run


def benchmark_model(
    name: str,
    batch: int,
    in_chans: int,
    size: int,
    fmt: str,
    device: str,
    rounds: int,
    clock: Callable[[], float] | None = None,
) -> dict[str, object]:
    torch.manual_seed(0)
    unfused = create_model(name, norm="bn", in_chans=in_chans, image_size=size).eval()
    _random_statistics_(unfused)
    report = fold_norms(unfused)
    memory_format = FORMATS[fmt]
    models = {"unfused": unfused, "fused": report.model}
    models = {key: model.to(device, memory_format=memory_format) for key, model in models.items()}
    x = torch.randn(batch, in_chans, size, size, device=device).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        error = float((models["fused"](x) - models["unfused"](x)).abs().max() / models["unfused"](x).abs().max())
    synchronize = device.startswith("cuda")
    times = compare({key: _forward(model, x, synchronize) for key, model in models.items()}, rounds=rounds, clock=clock)
    return {
        "model": name,
        "input": f"{batch}x{in_chans}x{size}x{size}",
        "format": fmt,
        "folded": f"{len(report.fused)}/{len(report.fused) + len(report.skipped)}",
        "unfused ms": times["unfused"] * 1e3,
        "fused ms": times["fused"] * 1e3,
        "fused / unfused": times["fused"] / times["unfused"],
        "fused img/s": batch / times["fused"],
        "max rel. diff": f"{error:.1e}",
    }


COLUMNS = [
    "model",
    "input",
    "format",
    "folded",
    "unfused ms",
    "fused ms",
    "fused / unfused",
    "fused img/s",
    "max rel. diff",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 4, few rounds")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU seconds of the process, not wall time (a loaded shared machine; one thread, CPU only)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row (default 15)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    if args.cpu_time:  # one clock for the timings and the machine line
        os.environ["BNZOO_BENCH_CLOCK"] = "thread"
    clock = None
    rows = []
    for name, batch, in_chans, size in WORKLOADS:
        for fmt in FORMATS:
            batch_size = 4 if args.quick else batch
            rows.append(benchmark_model(name, batch_size, in_chans, size, fmt, args.device, rounds, clock))
    timed = "CPU time" if args.cpu_time else "wall time"
    print(f"Eval forward (inference_mode), norm 'bn' folded vs unfused, {args.device}, {timed}: {machine_line()}")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
