"""Images per second of one training epoch through ``bnzoo fit`` against a plain PyTorch loop.

Both train the same model (from the registry) on the same Fashion-MNIST DataModule with the same batch size,
optimizer (SGD with momentum) and loss. ``bnzoo fit`` runs with everything a user gets by default -- metrics,
TensorBoard logging, the learning-rate monitor, the progress bar, checkpointing -- but without validation, and
only the training epoch is timed (from its first to its last batch, by a callback). The two alternate, and
the figure is the median of ``--repeats`` epochs each. Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.training             # resnet20 and mlp
    .venv/bin/python -m benchmarks.training --quick                       # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from benchmarks.timing import format_table, machine_line
from bnzoo import create_model
from bnzoo.cli import BnzooCLI
from bnzoo.data import FashionMNISTDataModule
from bnzoo.optim import build_sgd


class EpochTimer(Callback):
    """Wall time of each training epoch, first batch to last."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def time_bnzoo_fit(model: str, subset: int, batch_size: int, run_dir: str) -> float:
    timer = EpochTimer()
    args = [
        "fit", "--config", "configs/fashion_mnist/resnet.yaml", "--model.init_args.model", model,
        "--data.init_args.train_subset", str(subset), "--data.init_args.batch_size", str(batch_size),
        "--data.init_args.augment", "false", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
        "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", run_dir,
        "--model.init_args.warmup_steps", "0",
    ]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        BnzooCLI(args=args, trainer_defaults={"callbacks": [timer]})
    return timer.times[-1]


def time_plain_loop(model_name: str, subset: int, batch_size: int) -> float:
    L.seed_everything(0, verbose=False)
    data = FashionMNISTDataModule(train_subset=subset, batch_size=batch_size, augment=False)
    data.setup("fit")
    model = create_model(model_name, norm="bn", num_classes=10, in_chans=1, image_size=28)
    model.to(memory_format=torch.channels_last)  # as ImageClassifier(channels_last=True) does
    optimizer = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    for images, labels in data.train_dataloader():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels).backward()
        optimizer.step()
    return time.perf_counter() - start


def benchmark(models: list[str], subset: int, batch_size: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    images = (subset // batch_size) * batch_size  # drop_last
    with tempfile.TemporaryDirectory() as run_dir:
        for model in models:
            fit, plain = [], []
            time_plain_loop(model, min(subset, 4 * batch_size), batch_size)  # warm-up
            for _ in range(repeats):
                plain.append(time_plain_loop(model, subset, batch_size))
                fit.append(time_bnzoo_fit(model, subset, batch_size, run_dir))
            t_fit, t_plain = statistics.median(fit), statistics.median(plain)
            rows.append({
                "model": model,
                "plain img/s": images / t_plain,
                "bnzoo fit img/s": images / t_fit,
                "overhead": t_fit / t_plain - 1.0,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mlp"])
    parser.add_argument("--subset", type=int, default=12800, help="training images per epoch")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.models, args.subset, args.repeats = ["mlp"], 512, 1
    torch.manual_seed(0)
    rows = benchmark(args.models, args.subset, args.batch_size, args.repeats)
    print(f"One training epoch of {args.subset} Fashion-MNIST images, batch {args.batch_size}: {machine_line()}")
    print(format_table(rows, ["model", "plain img/s", "bnzoo fit img/s", "overhead"]))
    print("target: overhead <= 0.05")


if __name__ == "__main__":
    main()
