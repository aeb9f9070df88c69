"""Callbacks from several ``--config`` files add up: the diagnostics preset appends (``callbacks+:``) and so does
``--trainer.callbacks+=``; a later config whose plain ``callbacks:`` would drop an earlier one's is warned about."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from bnzoo.callbacks import (
    ActivationPercentiles,
    LandscapeProbe,
    NormStatistics,
    RecalibrateNormStats,
    RenormSchedule,
)
from bnzoo.cli.config import check_config_files
from bnzoo.cli.lightning_cli import BnzooCLI

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTICS = str(ROOT / "configs/trainer/diagnostics.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _callback_types(*args: str) -> list[type]:
    cli = BnzooCLI(args=[*args, "--trainer.logger", "false"], run=False)
    return [type(c) for c in cli.trainer.callbacks]


def test_main_config_plus_diagnostics_preset_keeps_every_callback() -> None:
    types = _callback_types("--config", str(ROOT / "configs/main.yaml"), "--config", DIAGNOSTICS)
    for wanted in (RenormSchedule, RecalibrateNormStats, NormStatistics, LandscapeProbe):
        assert types.count(wanted) == 1, (wanted, types)
    assert types.index(RecalibrateNormStats) < types.index(NormStatistics)  # appended after the config's own
    preset = yaml.safe_load(Path(DIAGNOSTICS).read_text())["trainer"]
    assert "callbacks" not in preset and len(preset["callbacks+"]) == 2  # the file appends, never replaces


def test_callbacks_plus_on_the_command_line_appends_with_its_arguments() -> None:
    cli = BnzooCLI(
        args=[
            "--config", str(ROOT / "configs/digits/mlp.yaml"), "--trainer.logger", "false",
            "--trainer.callbacks+=bnzoo.callbacks.ActivationPercentiles",
            "--trainer.callbacks.modules", "model.blocks.2.act", "--trainer.callbacks.units", "3",
        ],
        run=False,
    )  # fmt: skip
    (recalibrate,) = [c for c in cli.trainer.callbacks if isinstance(c, RecalibrateNormStats)]
    (percentiles,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationPercentiles)]
    assert recalibrate.num_batches == 20 and percentiles.modules == ["model.blocks.2.act"]


def test_a_later_config_that_replaces_callbacks_is_warned_about(tmp_path: Path) -> None:
    replacing = tmp_path / "mine.yaml"
    replacing.write_text("trainer:\n  callbacks:\n    - class_path: bnzoo.callbacks.NormStatistics\n")
    main = str(ROOT / "configs/main.yaml")
    with pytest.warns(UserWarning, match="replaces those of .*main.yaml .*RecalibrateNormStats.*callbacks\\+:"):
        check_config_files(["fit", "--config", main, "--config", str(replacing)])
    with pytest.warns(UserWarning, match="RecalibrateNormStats"):
        types = _callback_types("--config", main, "--config", str(replacing))
    assert RecalibrateNormStats not in types  # what the warning says: jsonargparse replaced the list
    appending = tmp_path / "appending.yaml"
    appending.write_text("trainer:\n  callbacks+:\n    - class_path: bnzoo.callbacks.NormStatistics\n")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config_files(["--config", main, "--config", DIAGNOSTICS, "--config", str(appending)])
    # a file after an appending one that replaces names every callback it drops
    with pytest.warns(UserWarning, match="RecalibrateNormStats, bnzoo.callbacks.NormStatistics"):
        check_config_files(["--config", main, f"--config={appending}", "--config", str(replacing)])
