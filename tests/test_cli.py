"""The ``bnzoo`` CLI end to end: every config parses and round-trips, every family trains a few steps, the
TensorBoard files hold what they should, a stopped run resumes exactly, and bad configs fail readably."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnzoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if "trainer" not in p.parts and "experiments" not in p.parts
)
PRESETS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
QUICK = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def run_cli(*args: str) -> str:
    """Run ``bnzoo`` in this process; returns what it printed. A SystemExit(0) (print_config) is fine."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            assert main(list(args)) == 0
        except SystemExit as stop:
            assert stop.code in (0, None), out.getvalue()
    return out.getvalue()


def run_subprocess(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bnzoo.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_prints_and_round_trips(config: Path, tmp_path: Path) -> None:
    printed = run_cli("fit", "--config", str(config), "--print_config")
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["class_path"].startswith("bnzoo.tasks.")
    (tmp_path / "printed.yaml").write_text(printed)
    assert yaml.safe_load(run_cli("fit", "--config", str(tmp_path / "printed.yaml"), "--print_config")) == parsed


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_trainer_presets_compose_with_model_configs(preset: Path) -> None:
    printed = yaml.safe_load(
        run_cli(
            "fit",
            "--config",
            str(ROOT / "configs/fashion_mnist/resnet.yaml"),
            "--config",
            str(preset),
            "--print_config",
        )
    )
    expected = yaml.safe_load(preset.read_text())["trainer"]
    for key, value in expected.items():
        if key == "callbacks+":  # appended to the model config's own (RecalibrateNormStats)
            paths = [c["class_path"] for c in printed["trainer"]["callbacks"]]
            assert paths == ["bnzoo.callbacks.RecalibrateNormStats"] + [c["class_path"] for c in value], paths
        elif key != "plugins":
            assert printed["trainer"][key] == value, key
    if "plugins" in expected:
        assert printed["trainer"]["plugins"][0]["class_path"] == "bnzoo.plugins.NormSync"


FAMILIES = [
    ("digits/resnet.yaml", []),
    ("digits/mlp.yaml", []),
    ("digits/ds2.yaml", []),
    ("fashion_mnist/resnet.yaml", ["--data.train_subset", "256", "--data.batch_size", "32"]),
    ("fashion_mnist/inception.yaml", ["--data.train_subset", "256", "--data.batch_size", "16"]),
    ("fashion_mnist/mlp.yaml", ["--data.train_subset", "256"]),
    ("fashion_mnist/timm_resnet.yaml", ["--data.train_subset", "256", "--data.batch_size", "16"]),
    ("fashion_mnist/ds2.yaml", ["--data.train_subset", "256", "--data.batch_size", "32"]),
    ("fashion_mnist/bn_lstm.yaml", ["--data.train_subset", "256", "--data.batch_size", "32"]),
]


@pytest.mark.parametrize(("config", "extra"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_fit_every_family_end_to_end(config: str, extra: list[str], tmp_path: Path) -> None:
    printed = run_cli(
        "fit",
        "--config",
        str(ROOT / "configs" / config),
        *QUICK,
        *extra,
        "--trainer.callbacks.init_args.num_batches",
        "2",
    )
    assert "best checkpoint: runs/" in printed and "tensorboard --logdir runs" in printed
    last = next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))
    checkpoint = torch.load(last, weights_only=True)  # plain hyperparameters: loads without pickled code
    assert checkpoint["global_step"] == 3
    assert isinstance(checkpoint["hyper_parameters"]["model"], str)


def test_tensorboard_holds_scalars_hparams_with_final_metrics_and_graph(tmp_path: Path) -> None:
    run_cli(
        "fit",
        "--config",
        str(ROOT / "configs/digits/resnet.yaml"),
        *QUICK,
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.callbacks.init_args.num_batches",
        "2",
    )
    (version,) = tmp_path.glob("runs/digits-resnet20-bn/version_*")
    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss_step",
        "train/acc_step",
        "train/acc_epoch",
        "train/acc_top5_step",
        "train/loss_epoch",
        "val/loss",
        "val/acc",
        "val/acc_top5",
        "hp/val_acc",
        "recalibrate/val_acc_before",
        "recalibrate/val_acc_after",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(tag.startswith("lr-SGD") for tag in scalars)
    final_val_acc = events.Scalars("val/acc")[-1].value
    assert events.Scalars("hp/val_acc")[-1].value == pytest.approx(final_val_acc)
    assert events.Scalars("hp/val_acc")[-1].value != -1
    hparams = events.summary_metadata.keys() if hasattr(events, "summary_metadata") else []
    assert any("hparams" in str(k) for k in hparams) or "_hparams_/session_start_info" in events.Tags().get(
        "tensors", []
    )
    assert events.Graph() is not None  # example_input_array traced in eval mode


class StopAfterEpochs(Callback):
    """Ends a run after ``epochs`` epochs, as a kill after a checkpoint would, without changing its schedule."""

    def __init__(self, epochs: int = 2) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_stopped_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    common = [
        "--config",
        str(ROOT / "configs/digits/mlp.yaml"),
        "--trainer.max_epochs",
        "4",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
    ]
    run_cli("fit", *common, "whole")
    run_cli("fit", *common, "split", "--trainer.callbacks+=tests.test_cli.StopAfterEpochs")
    stopped = torch.load(tmp_path / "split/digits-mlp-bn/version_0/checkpoints/last.ckpt", weights_only=True)
    run_cli("fit", *common, "split", "--ckpt_path", "last")
    whole = torch.load(tmp_path / "whole/digits-mlp-bn/version_0/checkpoints/last.ckpt", weights_only=True)
    split = torch.load(tmp_path / "split/digits-mlp-bn/version_0/checkpoints/last.ckpt", weights_only=True)
    assert 2 * stopped["global_step"] == whole["global_step"] > 0  # stopped after 2 of 4 epochs
    assert split["global_step"] == whole["global_step"]
    assert split["epoch"] == whole["epoch"] == 3
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(split["state_dict"][key], value, msg=key)
    for key in ("val/acc", "val/loss"):
        assert split["callbacks"] and _metric(tmp_path / "split", key) == pytest.approx(
            _metric(tmp_path / "whole", key)
        )


def _metric(save_dir: Path, tag: str) -> float:
    versions = sorted(save_dir.glob("digits-mlp-bn/version_*"))
    events = EventAccumulator(str(versions[-1]))
    events.Reload()
    return events.Scalars(tag)[-1].value


def test_test_and_predict_from_a_checkpoint(tmp_path: Path) -> None:
    config = ["--config", str(ROOT / "configs/digits/mlp.yaml")]
    run_cli("fit", *config, *QUICK)
    last = str(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")))
    printed = run_cli("test", *config, "--trainer.enable_progress_bar", "false", "--ckpt_path", last)
    assert "test/acc:" in printed
    run_cli("predict", *config, "--trainer.enable_progress_bar", "false", "--ckpt_path", last)


def test_without_a_logger_nothing_lands_in_the_working_directory(tmp_path: Path) -> None:
    printed = run_cli("fit", "--config", str(ROOT / "configs/digits/mlp.yaml"), *QUICK, "--trainer.logger", "false")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no ./checkpoints, no ./config.yaml
    assert (tmp_path / "runs/digits-mlp-bn/version_0/checkpoints/last.ckpt").is_file()
    assert "last checkpoint: runs/digits-mlp-bn/version_0/checkpoints/last.ckpt" in printed


def test_optimizer_and_scheduler_from_the_command_line_replace_the_defaults(tmp_path: Path) -> None:
    config = ["--config", str(ROOT / "configs/digits/mlp.yaml"), *QUICK]
    run_cli("fit", *config)  # the task's default: SGD with momentum, warm-up + cosine per step (LambdaLR)
    default = torch.load(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")), weights_only=True)
    assert "momentum_buffer" in next(iter(default["optimizer_states"][0]["state"].values()))
    assert "lr_lambdas" in default["lr_schedulers"][0]
    for path in tmp_path.glob("runs/*/version_*/checkpoints/*.ckpt"):
        path.unlink()
    injected = ["--optimizer", "AdamW", "--optimizer.lr", "0.003", "--lr_scheduler", "StepLR"]
    run_cli("fit", *config, *injected, "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5")
    checkpoint = torch.load(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")), weights_only=True)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert "exp_avg" in next(iter(checkpoint["optimizer_states"][0]["state"].values()))  # AdamW's state
    assert group["initial_lr"] == 0.003 and group["lr"] == pytest.approx(0.003 * 0.5)  # one epoch of StepLR
    assert checkpoint["lr_schedulers"][0]["step_size"] == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.model", "resnet21"], "unknown model 'resnet21'; closest: resnet32, resnet20"),
        (["--model.init_args.norm", "batchnorm"], "unknown norm kind 'batchnorm'"),
        (["--model.init_args.lr", "fast"], "lr"),
        (["--model.init_args.model_options", "{depth: 3}"], "unknown option(s) depth"),
    ],
)
def test_bad_config_fails_with_a_message_not_a_traceback(override: list[str], message: str) -> None:
    result = run_subprocess(
        "fit",
        "--config",
        str(ROOT / "configs/digits/mlp.yaml"),
        *override,
        "--print_config" if override[0].endswith("lr") else "--trainer.fast_dev_run",
        "true",
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_missing_data_names_the_path_and_the_remedy(tmp_path: Path) -> None:
    result = run_subprocess(
        "fit",
        "--config",
        str(ROOT / "configs/cifar10/resnet.yaml"),
        "--data.init_args.download",
        "false",
        "--data.init_args.data_dir",
        str(tmp_path / "nowhere"),
        "--trainer.fast_dev_run",
        "true",
    )
    assert result.returncode != 0
    assert str(tmp_path / "nowhere") in result.stderr and "download" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_recalibrate_command_rewrites_statistics_only(tmp_path: Path) -> None:
    config = ["--config", str(ROOT / "configs/digits/mlp.yaml")]
    run_cli("fit", *config, *QUICK, "--trainer.callbacks", "[]")  # trained without recalibration
    last = next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))
    printed = run_cli("recalibrate", *config, "--ckpt_path", str(last), "--num_batches", "5", "--population")
    assert "recalibrated 3 norm layers from 5 batches (population)" in printed and "val/acc:" in printed
    before = torch.load(last, weights_only=True)
    after = torch.load(last.with_name("last-recalibrated.ckpt"), weights_only=True)
    assert after["global_step"] == before["global_step"]
    changed = [k for k in before["state_dict"] if not torch.equal(before["state_dict"][k], after["state_dict"][k])]
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed), changed


def test_recalibrate_command_names_both_architectures_on_a_mismatch(tmp_path: Path) -> None:
    run_cli("fit", "--config", str(ROOT / "configs/digits/mlp.yaml"), *QUICK, "--trainer.callbacks", "[]")
    last = str(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")))
    result = run_subprocess("recalibrate", "--config", str(ROOT / "configs/digits/resnet.yaml"), "--ckpt_path", last)
    assert result.returncode == 2
    assert "holds mlp with norm 'bn'" in result.stderr
    assert "model: checkpoint 'mlp', asked for 'resnet20'" in result.stderr


def test_a_checkpoint_of_another_model_or_norm_is_refused_naming_both(tmp_path: Path) -> None:
    run_cli("fit", "--config", str(ROOT / "configs/digits/mlp.yaml"), *QUICK, "--trainer.callbacks", "[]")
    last = str(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")))
    result = run_subprocess(
        "test",
        "--config",
        str(ROOT / "configs/digits/mlp.yaml"),
        "--model.init_args.norm",
        "renorm",
        "--ckpt_path",
        last,
    )
    assert result.returncode == 2
    assert "not what the config builds, mlp with norm 'renorm'" in result.stderr
    assert "norm: checkpoint 'bn', asked for 'renorm'" in result.stderr
    assert "Traceback" not in result.stderr
