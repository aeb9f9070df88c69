"""Every ``bnzoo`` command of the README's ``bash`` blocks runs as written: each block's commands in order, in one
fresh folder (so ``--ckpt_path last`` resumes the run an earlier line of the block started), as a subprocess of
``python -m bnzoo.cli``, with a few steps and batches appended (the ``TINY`` overrides of its subcommand). The
commands that cannot run here are listed in ``SKIPPED`` with the reason; a README command that is neither run
nor skipped by name fails the test, and so does a skip that no longer names a README command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_LIGHTNING = [
    "--trainer.max_epochs", "1", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2", "--trainer.limit_predict_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--data.init_args.train_subset", "64", "--data.init_args.batch_size", "16",
]  # fmt: skip
#: what is appended to each subcommand's command line (LightningCLI and argparse both take the last value given)
TINY: dict[str, list[str]] = {
    "fit": _LIGHTNING,
    "validate": _LIGHTNING,
    "test": _LIGHTNING,
    "predict": _LIGHTNING,
    "recalibrate": [
        "--num_batches",
        "2",
        "--data.init_args.train_subset",
        "64",
        "--data.init_args.val_size",
        "64",
        "--data.init_args.batch_size",
        "16",
    ],  # fmt: skip
}

_GPU = "needs a GPU" if not torch.cuda.is_available() else ""
#: README commands not run, each with the reason (exact command lines, comments stripped)
SKIPPED: dict[str, str] = {
    "bnzoo fit --config configs/fashion_mnist/resnet.yaml --config configs/trainer/gpu.yaml": _GPU,
    "bnzoo experiment run c8_renorm --threads 1": "trains a whole experiment (tens of minutes); "
    "tests/test_experiments.py runs experiments with --quick",
    "bnzoo experiment run all --jobs 2 --threads 1": "trains the whole claims suite (over an hour)",
    "bnzoo experiment report --readme README.md": "rewrites reports/ and the README from the committed results "
    "(tests/test_lab_report.py checks the report)",
}
SKIPPED = {command: reason for command, reason in SKIPPED.items() if reason}

#: lines of the bash blocks that are not bnzoo commands (set-up scripts, other programs)
NOT_BNZOO = ("bash scripts/", "tensorboard ")


def image_fixture(folder: Path) -> None:
    """``my_images/``: the user's own files of the predict examples (a grayscale PNG and an RGB JPEG)."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "shirt.png")
    Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8)).save(folder / "photo.jpg")


#: files a README command names as the user's own, made before the block runs
FIXTURES = {"my_images/": image_fixture}


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block: continuations joined, blank and comment-only lines dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines, current = [], ""
        for raw in body.splitlines():
            current += raw.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            if current.strip() and not current.strip().startswith("#"):
                lines.append(current.strip())
            current = ""
        blocks.append(lines)
    return blocks


def as_written(line: str) -> str:
    """A command line without its comment, spaces normalized (the key of :data:`SKIPPED`)."""
    return shlex.join(shlex.split(line, comments=True))


BLOCKS = [block for block in bash_blocks(README.read_text()) if any(line.startswith("bnzoo ") for line in block)]


def test_the_readme_has_commands_and_every_skip_names_one() -> None:
    commands = {as_written(line) for block in BLOCKS for line in block}
    assert len(commands) >= 15, sorted(commands)
    assert not set(SKIPPED) - commands, f"SKIPPED names no README command: {set(SKIPPED) - commands}"
    others = [line for block in bash_blocks(README.read_text()) for line in block if not line.startswith("bnzoo ")]
    assert all(line.startswith(NOT_BNZOO) for line in others), others


def _run(tokens: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BNZOO_DEBUG": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bnzoo.cli", *tokens], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_readme_command_runs_as_written(block: list[str], tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the README's paths are relative to the repository
    ran = 0
    for line in block:
        if not line.startswith("bnzoo "):
            continue
        command = as_written(line)
        if command in SKIPPED:
            continue
        tokens = shlex.split(line, comments=True)[1:]
        for name, make in FIXTURES.items():
            if name in tokens:
                make(tmp_path / name)
        result = _run([*tokens, *TINY.get(tokens[0], [])], tmp_path)
        assert result.returncode == 0, (
            f"{command}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        ran += 1
    assert ran, f"nothing of {block} ran"
