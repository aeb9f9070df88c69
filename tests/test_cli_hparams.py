"""The hyperparameters a run logs (TensorBoard's hparams and ``hparams.yaml``) are the run that happened: the
optimizer and scheduler that ran (checked against the optimizer state the checkpoint saved), the seed, batch size,
trainer limits and data options; no ``_class_path`` / ``_instantiator``; ``--lr_scheduler`` without ``--optimizer``
is refused instead of being ignored."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from bnzoo.cli import main
from bnzoo.cli.hparams import run_hparams
from bnzoo.data import DigitsDataModule
from bnzoo.tasks import ImageClassifier
from bnzoo.tasks.run_hparams import SGD_HPARAMS, flatten, task_run_hparams

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip
MLP = ["--config", str(ROOT / "configs/digits/mlp.yaml")]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _run(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(list(args)) == 0


def tensorboard_hparams(version: Path) -> dict[str, Any]:
    """The hparams of the TensorBoard session in ``version`` (the plugin's own protobuf, read back)."""
    found: dict[str, Any] = {}
    for path in version.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    for name, item in data.session_start_info.hparams.items():
                        found[name] = getattr(item, item.WhichOneof("kind"))
    assert found, f"no TensorBoard hparams in {version}"
    return found


def _only_version(tmp_path: Path) -> Path:
    (version,) = tmp_path.glob("runs/*/version_*")
    return version


def _no_bookkeeping(keys: Any) -> None:
    bad = [k for k in keys if k.startswith("_") or "class_path" in k or "instantiator" in k or "init_args" in k]
    assert not bad, bad


def test_adamw_and_steplr_are_what_is_logged_not_the_tasks_sgd(tmp_path: Path) -> None:
    _run(
        "fit", *MLP, *QUICK, "--seed_everything", "7", "--data.init_args.batch_size", "32",
        "--optimizer", "AdamW", "--optimizer.lr", "0.003", "--optimizer.weight_decay", "0.02",
        "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "5", "--lr_scheduler.gamma", "0.5",
    )  # fmt: skip
    version = _only_version(tmp_path)
    logged = tensorboard_hparams(version)
    stored = yaml.safe_load((version / "hparams.yaml").read_text())
    _no_bookkeeping(logged)
    _no_bookkeeping(stored)
    # the reference: what the optimizer and scheduler of the run saved in its checkpoint
    checkpoint = torch.load(version / "checkpoints/last.ckpt", weights_only=True)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert "exp_avg" in next(iter(checkpoint["optimizer_states"][0]["state"].values()))  # it was AdamW
    assert logged["optimizer"] == stored["optimizer"] == "AdamW"
    assert logged["optimizer/lr"] == pytest.approx(group["initial_lr"]) and stored["optimizer/lr"] == 0.003
    assert logged["optimizer/weight_decay"] == pytest.approx(group["weight_decay"])
    assert stored["optimizer/betas"] == list(group["betas"]) and stored["optimizer/eps"] == group["eps"]
    assert logged["lr_scheduler"] == "StepLR"
    assert logged["lr_scheduler/step_size"] == checkpoint["lr_schedulers"][0]["step_size"] == 5
    assert logged["lr_scheduler/gamma"] == pytest.approx(checkpoint["lr_schedulers"][0]["gamma"])
    for unused in SGD_HPARAMS + ("schedule", "warmup_steps", "optimizer/momentum"):
        assert unused not in logged and unused not in stored, unused
    assert logged["seed"] == 7 and logged["data/batch_size"] == 32 and logged["data"] == "DigitsDataModule"
    assert logged["trainer/max_epochs"] == 1 and logged["trainer/max_steps"] == -1
    assert logged["trainer/callbacks"] == "RecalibrateNormStats"
    assert logged["model"] == "mlp" and logged["norm"] == "bn" and logged["num_classes"] == 10  # linked value


def test_the_tasks_own_sgd_and_schedule_are_logged_as_such(tmp_path: Path) -> None:
    _run("fit", *MLP, *QUICK, "--trainer.max_steps", "3", "--model.init_args.lr", "0.05")
    version = _only_version(tmp_path)
    logged = tensorboard_hparams(version)
    _no_bookkeeping(logged)
    checkpoint = torch.load(version / "checkpoints/last.ckpt", weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert logged["optimizer"] == "SGD" and "momentum_buffer" in next(
        iter(checkpoint["optimizer_states"][0]["state"].values())
    )
    assert logged["optimizer/lr"] == pytest.approx(groups[0]["initial_lr"]) == pytest.approx(0.05)
    assert logged["optimizer/momentum"] == pytest.approx(groups[0]["momentum"])
    assert logged["optimizer/weight_decay"] == pytest.approx(max(g["weight_decay"] for g in groups))
    config = yaml.safe_load((ROOT / "configs/digits/mlp.yaml").read_text())
    assert logged["lr_scheduler"] == config["model"]["init_args"].get("schedule", "cosine")
    assert logged["trainer/max_steps"] == 3
    assert "lr" not in logged and "schedule" not in logged  # only under optimizer/ and lr_scheduler/


def test_lr_scheduler_without_optimizer_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", *MLP, *QUICK, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "2"]) == 2
    error = capsys.readouterr().err
    assert "--lr_scheduler without --optimizer" in error and "--model.init_args.schedule" in error
    assert len(error.strip().splitlines()) <= 3


def test_task_run_hparams_by_hand() -> None:
    hparams = {
        "model": "resnet20", "norm": "renorm", "norm_options": {"momentum": 0.1}, "lr": 0.1, "momentum": 0.9,
        "weight_decay": 5e-4, "nesterov": False, "decay_norm_and_bias": False, "schedule": "step",
        "warmup_steps": 10, "milestones": [0.5], "gamma": 0.2, "_class_path": "bnzoo.tasks.ImageClassifier",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }  # fmt: skip
    assert task_run_hparams(hparams) == {
        "model": "resnet20", "norm": "renorm", "norm_options/momentum": 0.1, "optimizer": "SGD",
        "optimizer/lr": 0.1, "optimizer/momentum": 0.9, "optimizer/weight_decay": 5e-4, "optimizer/nesterov": False,
        "optimizer/decay_norm_and_bias": False, "lr_scheduler": "step", "lr_scheduler/warmup_steps": 10,
        "lr_scheduler/milestones": [0.5], "lr_scheduler/gamma": 0.2,
    }  # fmt: skip
    adam = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001, "betas": (0.9, 0.99)}}
    assert task_run_hparams(hparams, adam) == {
        "model": "resnet20", "norm": "renorm", "norm_options/momentum": 0.1, "optimizer": "Adam",
        "optimizer/lr": 0.001, "optimizer/betas": [0.9, 0.99], "lr_scheduler": "none",
    }  # fmt: skip
    with pytest.raises(ValueError, match="--lr_scheduler without --optimizer"):
        task_run_hparams(hparams, None, {"class_path": "torch.optim.lr_scheduler.StepLR"})
    assert flatten({"a": {"b": {"c": 1}}, "_x": 2, "s": {"class_path": "x.Y", "init_args": {"k": 3}}}) == {
        "a/b/c": 1, "s": "Y", "s/k": 3,
    }  # fmt: skip


def test_run_hparams_of_a_config_names_strategy_callbacks_and_plugins() -> None:
    config = {
        "seed_everything": 3, "model": {"class_path": "bnzoo.tasks.ImageClassifier"},
        "data": {"class_path": "bnzoo.data.DigitsDataModule", "init_args": {"batch_size": 16}},
        "trainer": {
            "max_steps": 5, "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy"},
            "callbacks": [{"class_path": "bnzoo.callbacks.RenormSchedule"}, {"class_path": "a.B"}],
            "plugins": [{"class_path": "bnzoo.plugins.NormSync"}],
        },
        "ckpt_path": "/x/last.ckpt",
    }  # fmt: skip
    logged = run_hparams(config, {"model": "mlp", "lr": 0.1})
    assert logged["trainer/strategy"] == "DDPStrategy" and logged["trainer/callbacks"] == "RenormSchedule, B"
    assert logged["trainer/plugins"] == "NormSync" and logged["seed"] == 3 and logged["data/batch_size"] == 16
    assert logged["task"] == "ImageClassifier" and logged["ckpt_path"] == "/x/last.ckpt"
    assert logged["optimizer"] == "SGD" and logged["optimizer/lr"] == 0.1


def test_a_plain_trainer_logs_the_flat_hparams_too(tmp_path: Path) -> None:
    L.seed_everything(5)
    task = ImageClassifier(model="mlp", in_chans=1, image_size=8, num_classes=10, lr=0.02)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="plain"),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    logged = tensorboard_hparams(next(tmp_path.glob("plain/version_*")))
    _no_bookkeeping(logged)
    assert logged["optimizer"] == "SGD" and logged["optimizer/lr"] == pytest.approx(0.02)
    assert logged["data"] == "DigitsDataModule" and logged["data/batch_size"] == 32
    assert logged["seed"] == 5 and logged["trainer/max_steps"] == 2
