"""Training-step time of the zoo's image families with norm ``bn`` vs ``none`` vs ``renorm``.

A step is forward + cross-entropy + backward + SGD (momentum 0.9) on one fixed batch, in training mode. The
three norms of a model are timed in interleaved rounds of one run (:func:`benchmarks.timing.compare`), and the
ratios are to ``bn`` of that run. Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.models            # the table
    .venv/bin/python -m benchmarks.models --quick                      # smoke run: small batches, few rounds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.timing import compare, format_table, machine_line
from bnzoo import create_model

NORMS: tuple[str, ...] = ("bn", "none", "renorm")


@dataclass(frozen=True)
class Workload:
    model: str
    batch: int
    in_chans: int = 3
    image_size: int = 32
    options: dict[str, object] = field(default_factory=dict)


WORKLOADS: list[Workload] = [
    Workload("resnet20", 128),  # He et al. 2015, Sec. 4.2: CIFAR-10, batch 128
    Workload("resnet20", 128, in_chans=1, image_size=28),  # Fashion-MNIST
    Workload("bn_inception_small", 128),
    Workload("mlp", 60, in_chans=1, image_size=28),  # Ioffe & Szegedy 2015, Sec. 4.1: MNIST, batch 60
    Workload("timm_resnet18", 64),
]


def train_step(workload: Workload, norm: str, batch: int) -> Callable[[], None]:
    """A closure doing one SGD step of ``workload``'s model with ``norm`` on a fixed random batch."""
    model = create_model(
        workload.model,
        norm=norm,
        in_chans=workload.in_chans,
        image_size=workload.image_size,
        **workload.options,
    ).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, workload.in_chans, workload.image_size, workload.image_size)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def benchmark(workloads: list[Workload], rounds: int, batch: int | None = None) -> list[dict[str, object]]:
    rows = []
    for workload in workloads:
        size = batch or workload.batch
        times = compare({norm: train_step(workload, norm, size) for norm in NORMS}, rounds=rounds)
        rows.append(
            {
                "model": workload.model,
                "input": f"{size}x{workload.in_chans}x{workload.image_size}x{workload.image_size}",
                **{f"{norm} ms": times[norm] * 1e3 for norm in NORMS},
                **{f"{norm} / bn": times[norm] / times["bn"] for norm in NORMS if norm != "bn"},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches of 8, 3 rounds")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per model (default 15)")
    args = parser.parse_args()
    rows = benchmark(WORKLOADS, rounds=3 if args.quick else args.rounds, batch=8 if args.quick else None)
    columns = ["model", "input", *(f"{n} ms" for n in NORMS), *(f"{n} / bn" for n in NORMS if n != "bn")]
    print(f"Training step (forward + backward + SGD), median of interleaved rounds: {machine_line()}")
    print(format_table(rows, columns))
    worst = max(float(row["renorm / bn"]) for row in rows)  # type: ignore[arg-type]
    print(f"worst renorm / bn: {worst:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
