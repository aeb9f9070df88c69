"""The ``bnzoo`` command itself: --help lists every subcommand, --version, an unknown subcommand is one line, and
Lightning's own logger and callbacks are usable by their short names (bnzoo shadows none of them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bnzoo
from bnzoo.cli import main
from bnzoo.cli.main import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand_and_version_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "recalibrate", "export", "pretrained", "experiment"):
        assert f"  {name} " in shown
    assert set(SUBCOMMANDS) == {
        "fit",
        "validate",
        "test",
        "predict",
        "recalibrate",
        "export",
        "pretrained",
        "experiment",
    }
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bnzoo {bnzoo.__version__}"


def test_an_unknown_subcommand_is_one_line_with_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fitt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown subcommand 'fitt'; closest: fit" in err[0]


@pytest.mark.slow
def test_lightnings_tensorboard_logger_and_lr_monitor_by_short_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "digits" / "mlp.yaml"), "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1",
            "--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "tb",
            "--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks.logging_interval", "step"]  # fmt: skip
    assert main(args) == 0
    (events,) = tmp_path.glob("tb/*/version_0/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    assert any(tag.startswith("lr-") for tag in accumulator.Tags()["scalars"]), accumulator.Tags()["scalars"]
