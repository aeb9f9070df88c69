"""Cost of the diagnostics callbacks enabled on every step, against the same training without them.

Each candidate trains ``--steps`` optimizer steps with Lightning (TensorBoard logger writing to a temporary
folder, no checkpoints, no validation) on in-memory data of Fashion-MNIST's shape; a one-step run of the same
setup is timed alongside, so the per-step time is ``(t(steps) - t(1 step)) / (steps - 1)`` -- the set-up cost of
a fit cancels. Rounds interleave the candidates (benchmarks/timing.py). Every callback logs on every step:

* ``ActivationPercentiles``: 3 units of the last hidden layer's pre-activations, scalars + histograms;
* ``NormStatistics``: histograms of weight, bias, running mean and variance of every norm layer;
* ``LandscapeProbe``: 4 step sizes, i.e. 4 extra forward + backward passes.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.diagnostics          # the README's table
    .venv/bin/python -m benchmarks.diagnostics --quick                    # smoke run
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.timing import compare, format_table, machine_line
from bnzoo.callbacks import ActivationPercentiles, LandscapeProbe, NormStatistics
from bnzoo.tasks import ImageClassifier

#: model -> (batch size, model options, the module whose input ActivationPercentiles follows)
MODELS: dict[str, tuple[int, dict[str, object], str]] = {
    "mlp": (60, {}, "model.blocks.2.act"),  # Ioffe & Szegedy 2015, Sec. 4.1: batch 60
    "resnet20": (32, {}, "model.stages.2.2.act"),
}

CALLBACKS: dict[str, Callable[[str], Callback]] = {
    "ActivationPercentiles": lambda module: ActivationPercentiles(module, units=3, every_n_steps=1),
    "NormStatistics": lambda module: NormStatistics(every_n_steps=1),
    "LandscapeProbe": lambda module: LandscapeProbe(every_n_steps=1),
}


def _fit(model: str, steps: int, callback: str | None, image_size: int) -> Callable[[], None]:
    batch_size, options, module = MODELS[model]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch_size * steps, 1, image_size, image_size, generator=g),
                         torch.randint(0, 10, (batch_size * steps,), generator=g))  # fmt: skip

    def run() -> None:
        torch.manual_seed(0)
        task = ImageClassifier(model=model, model_options=options, in_chans=1, image_size=image_size, lr=0.01)
        with tempfile.TemporaryDirectory() as folder:
            trainer = L.Trainer(
                max_steps=steps,
                logger=TensorBoardLogger(folder, name="bench"),
                callbacks=[CALLBACKS[callback](module)] if callback else [],
                log_every_n_steps=1,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu",
            )  # fmt: skip
            trainer.fit(task, DataLoader(data, batch_size=batch_size))

    return run


def benchmark(models: list[str], steps: dict[str, int], rounds: int, image_size: int) -> list[dict[str, object]]:
    rows = []
    for model in models:
        n = steps[model]
        candidates = {"one step": _fit(model, 1, None, image_size), "off": _fit(model, n, None, image_size)}
        candidates |= {name: _fit(model, n, name, image_size) for name in CALLBACKS}
        times = compare(candidates, rounds=rounds, round_s=0.0)
        per_step = {name: (t - times["one step"]) / (n - 1) for name, t in times.items() if name != "one step"}
        for name in ("off", *CALLBACKS):
            rows.append({"model": model, "callback": name, "ms / step": per_step[name] * 1e3,
                         "x off": per_step[name] / per_step["off"]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the MLP only, few steps and rounds")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.quick:
        rows = benchmark(["mlp"], {"mlp": 4}, rounds=1, image_size=28)
    else:
        rows = benchmark(list(MODELS), {"mlp": 40, "resnet20": 8}, rounds=args.rounds, image_size=28)
    print(f"Training step with each diagnostics callback logging on every step, CPU: {machine_line()}")
    print(format_table(rows, ["model", "callback", "ms / step", "x off"]))


if __name__ == "__main__":
    main()
