"""``bnzoo fit`` with DDP on 2 CPU processes (gloo) and NormSync, run as a subprocess of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from bnzoo.data import DigitsDataModule
from bnzoo.tasks import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]


class RecordNormState(Callback):
    """Saves each rank's norm buffers after ``step`` training steps (before the final recalibration)."""

    def __init__(self, out_dir: str, step: int = 2) -> None:
        self.out_dir, self.step = out_dir, step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            buffers = {k: v.clone() for k, v in pl_module.state_dict().items() if "running" in k}
            torch.save(buffers, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _fit_ddp(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "bnzoo.cli", "fit",
        "--config", str(ROOT / "configs/digits/resnet.yaml"), "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"),
        "--model.init_args.norm", "renorm", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.num_batches", "3",
        "--trainer.callbacks+=tests.test_ddp_cli.RecordNormState", f"--trainer.callbacks.out_dir={tmp_path}",
        *extra,
    ]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)


def test_ddp_fit_with_norm_sync_trains_in_sync_and_its_checkpoint_loads_in_one_process(tmp_path: Path) -> None:
    result = _fit_ddp(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in rank0.items():  # global batch moments: both processes keep identical running statistics
        torch.testing.assert_close(rank1[key], value, msg=key)

    last = tmp_path / "runs/digits-resnet20-renorm/version_0/checkpoints/last.ckpt"
    model = ImageClassifier.load_from_checkpoint(last, map_location="cpu")
    assert model.hparams.norm == "renorm"
    assert {type(m).__name__ for m in model.modules()} >= {"BatchRenorm2d"}
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    metrics = model.evaluate(data.val_dataloader())
    assert 0.0 <= metrics["acc"] <= 1.0 and torch.isfinite(torch.tensor(metrics["loss"]))


def test_without_norm_sync_the_processes_keep_different_statistics(tmp_path: Path) -> None:
    result = _fit_ddp(tmp_path, "--trainer.plugins", "null")
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert any(not torch.allclose(rank0[k], rank1[k]) for k in rank0)  # the check above can fail
