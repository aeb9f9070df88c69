"""Time of recalibrating norm statistics, against torch's ``swa_utils.update_bn`` and a plain forward pass.

All three see the same model and the same pre-built batches (so data loading is not timed):

* ``forward``: one no-grad forward pass over the batches in eval mode -- the floor;
* ``update_bn``: ``torch.optim.swa_utils.update_bn`` (cumulative averages of BatchNorm's own updates);
* ``bnzoo``: :func:`bnzoo.norms.recalibrate_norm_stats` (Ioffe & Szegedy 2015, Alg. 2), and with
  ``population=True``.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.recalibration
    .venv/bin/python -m benchmarks.recalibration --quick
"""

from __future__ import annotations

import argparse

import torch
from torch.optim.swa_utils import update_bn

from benchmarks.timing import compare, format_table, machine_line
from bnzoo import create_model
from bnzoo.norms import recalibrate_norm_stats


def benchmark(model_name: str, norm: str, batches: int, batch_size: int, rounds: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = create_model(model_name, norm=norm, num_classes=10, in_chans=1, image_size=28)
    data = [torch.randn(batch_size, 1, 28, 28) for _ in range(batches)]

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        for x in data:
            model(x)

    def swa_update_bn() -> None:
        update_bn(data, model)

    def bnzoo(population: bool):
        return lambda: recalibrate_norm_stats(model, data, model, num_batches=batches, population=population)

    candidates = {"forward": forward, "bnzoo": bnzoo(False), "bnzoo population": bnzoo(True)}
    if norm == "bn":  # update_bn drives BatchNorm's own running averages: it does not apply to renorm's
        candidates["update_bn"] = swa_update_bn
    times = compare(candidates, rounds=rounds, round_s=0.0)
    row: dict[str, object] = {"model": f"{model_name} ({norm})", "forward ms": times["forward"] * 1e3}
    for name in ("bnzoo", "bnzoo population", "update_bn"):
        if name in times:
            row[f"{name} / forward"] = times[name] / times["forward"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cases = [("resnet20", "bn"), ("resnet20", "renorm"), ("mlp", "bn")]
    if args.quick:
        cases, args.batches, args.rounds = [("mlp", "bn")], 2, 1
    rows = [benchmark(model, norm, args.batches, args.batch_size, args.rounds) for model, norm in cases]
    print(f"Recalibration over {args.batches} batches of {args.batch_size} (28x28): {machine_line()}")
    print(format_table(rows, ["model", "forward ms", "bnzoo / forward", "bnzoo population / forward",
                              "update_bn / forward"]))
    print("target: bnzoo / forward <= 1.10")


if __name__ == "__main__":
    main()
