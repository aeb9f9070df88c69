"""Every bad input gets one clear error: a table of bad command lines, each run as its own ``bnzoo`` process.

For each, the command must exit with status 2 and at most three lines on stderr (no usage dump, no traceback), the
first one ``bnzoo <command>: error: ...`` naming the offending option or file (``names``) and, where there is a
choice, what is valid (``valid``). The processes are forked from one server that has imported bnzoo once
(``tests/cli_forkserver.py``: a fresh ``bnzoo`` pays 3-5 s of imports), each in a folder of its own;
:func:`test_a_forked_command_behaves_as_a_fresh_process` checks that a forked command prints what a fresh
``python -m bnzoo.cli`` prints.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.cli_forkserver import run_forked

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MLP = ["--config", str(CONFIGS / "digits/mlp.yaml")]
RESNET = ["--config", str(CONFIGS / "digits/resnet.yaml")]
FAST = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false"]  # fmt: skip


class Case(NamedTuple):
    id: str
    argv: list[str]
    names: str  # in the first stderr line: the option or file
    valid: str | None = None  # in the first stderr line: what is valid


#: ``{fx}`` in an argument becomes the fixtures folder
CASES = [
    # config files and keys
    Case("config-missing", ["fit", "--config", "{fx}/nope.yaml"], "nope.yaml", "does not exist"),
    Case("config-malformed", ["fit", "--config", "{fx}/malformed.yaml"], "malformed.yaml: not valid YAML", "line 2"),
    Case("config-a-list", ["fit", "--config", "{fx}/list.yaml"], "list.yaml", "mapping of sections"),
    Case(
        "config-misspelled-key",
        ["fit", *MLP, "--config", "{fx}/misspelled.yaml"],
        "traner.max_epochs",
        "trainer.max_epochs",
    ),
    Case("option-misspelled", ["fit", *MLP, "--trainer.max_epocs", "3"], "trainer.max_epocs", "trainer.max_epochs"),
    Case("subcommand-unknown", ["fitt", *MLP], "fitt", "fit"),
    Case("seed-type", ["fit", *MLP, "--seed_everything", "abc"], "seed_everything", "int"),
    # the task
    Case("lr-type", ["fit", *MLP, "--model.init_args.lr", "fast"], "--model.init_args.lr", "float"),
    Case("lr-negative", ["fit", *MLP, "--model.init_args.lr", "-1"], "lr", "finite number > 0"),
    Case("lr-nan", ["fit", *MLP, "--model.init_args.lr", ".nan"], "lr", "finite number > 0"),
    Case("lr-infinite", ["fit", *MLP, "--model.init_args.lr", ".inf"], "lr", "finite number > 0"),
    Case("momentum-negative", ["fit", *MLP, "--model.init_args.momentum", "-0.5"], "momentum", ">= 0"),
    Case("weight-decay-negative", ["fit", *MLP, "--model.init_args.weight_decay", "-0.01"], "weight_decay", ">= 0"),
    Case("schedule-unknown", ["fit", *MLP, "--model.init_args.schedule", "linear"], "schedule 'linear'", "cosine"),
    Case("warmup-negative", ["fit", *MLP, "--model.init_args.warmup_steps", "-3"], "warmup_steps", "int >= 0"),
    Case("label-smoothing", ["fit", *MLP, "--model.init_args.label_smoothing", "1.5"], "label_smoothing", "[0, 1)"),
    Case(
        "milestones-unordered", ["fit", *MLP, "--model.init_args.milestones", "[0.8, 0.2]"], "milestones", "increasing"
    ),
    Case("model-unknown", ["fit", *MLP, "--model.init_args.model", "resnet21"], "model 'resnet21'", "resnet20"),
    Case("norm-unknown", ["fit", *MLP, "--model.init_args.norm", "batchnorm"], "norm kind 'batchnorm'", "renorm"),
    Case(
        "model-option-unknown", ["fit", *MLP, "--model.init_args.model_options", "{depth: 3}"], "depth", "valid options"
    ),
    Case(
        "model-options-pretrained",
        ["fit", *MLP, "--model.init_args.model_options", "{pretrained: true}"],
        "model_options.pretrained",
        "valid model options",
    ),
    Case("norm-option-unknown", ["fit", *MLP, "--model.init_args.norm_options", "{r_max: 2.0}"], "r_max", "valid"),
    Case("task-class-unknown", ["fit", *MLP, "--model", "NoSuchTask"], "NoSuchTask", None),
    # the data
    Case("data-class-unknown", ["fit", *MLP, "--data", "NoSuchDataModule"], "NoSuchDataModule", None),
    Case("batch-size-zero", ["fit", *MLP, "--data.init_args.batch_size", "0"], "batch_size", "int >= 1"),
    Case("batch-size-type", ["fit", *MLP, "--data.init_args.batch_size", "many"], "batch_size", "int"),
    Case(
        "batch-size-over-dataset",
        ["fit", *MLP, "--data.init_args.batch_size", "100000"],
        "batch_size=100000",
        "lower batch_size",
    ),
    Case("val-size", ["fit", *MLP, "--data.init_args.val_size", "1.5"], "val_size", "[0, 1)"),
    Case("num-workers", ["fit", *MLP, "--data.init_args.num_workers", "-1"], "num_workers", "int >= 0"),
    Case(
        "normalization", ["fit", *MLP, "--data.init_args.normalization", "zscore"], "normalization 'zscore'", "dataset"
    ),
    Case(
        "train-subset-over-dataset", ["fit", *MLP, "--data.init_args.train_subset", "99999"], "train_subset=99999", None
    ),
    Case(
        "data-root-unwritable",
        ["fit", "--config", str(CONFIGS / "mnist/mlp.yaml"), "--data.init_args.data_dir", "{fx}/a-file/data"],
        "{fx}/a-file/data",
        None,
    ),
    # the trainer
    Case("max-epochs-negative", ["fit", *MLP, "--trainer.max_epochs", "-5"], "--trainer.max_epochs -5", "-1"),
    Case("max-epochs-zero", ["fit", *MLP, "--trainer.max_epochs", "0"], "--trainer.max_epochs 0", ">= 1"),
    Case("max-steps-zero", ["fit", *MLP, "--trainer.max_steps", "0"], "--trainer.max_steps 0", ">= 1"),
    Case("devices-zero", ["fit", *MLP, "--trainer.devices", "0"], "--trainer.devices", "auto"),
    Case(
        "accelerator-gpu-without-gpu", ["fit", *MLP, "--trainer.accelerator", "gpu"], "--trainer.accelerator gpu", "cpu"
    ),
    Case(
        "gpu-preset-without-gpu",
        ["fit", *MLP, "--config", str(CONFIGS / "trainer/gpu.yaml")],
        "--trainer.accelerator gpu",
        "cpu",
    ),
    Case("precision-unknown", ["fit", *MLP, "--trainer.precision", "17"], "--trainer.precision", "bf16-mixed"),
    Case("strategy-unknown", ["fit", *MLP, "--trainer.strategy", "nope"], "nope", None),
    Case("callback-unknown", ["fit", *MLP, "--trainer.callbacks+=nosuch.Callback"], "--trainer.callbacks", "nosuch"),
    Case("optimizer-unknown", ["fit", *MLP, "--optimizer", "NoSuchOptimizer"], "NoSuchOptimizer", None),
    # checkpoints
    Case("ckpt-missing", ["test", *MLP, "--ckpt_path", "{fx}/nosuch.ckpt"], "nosuch.ckpt", None),
    Case("ckpt-unknown-name", ["test", *MLP, "--ckpt_path", "digits-mlp-bnn"], "'digits-mlp-bnn'", "digits-mlp-bn"),
    Case("ckpt-empty", ["test", *MLP, "--ckpt_path", "{fx}/empty.ckpt"], "empty.ckpt", "torch checkpoint"),
    Case("ckpt-truncated", ["test", *MLP, "--ckpt_path", "{fx}/truncated.ckpt"], "truncated.ckpt", "torch checkpoint"),
    Case("ckpt-random-bytes", ["test", *MLP, "--ckpt_path", "{fx}/random.ckpt"], "random.ckpt", None),
    Case(
        "ckpt-safetensors", ["test", *MLP, "--ckpt_path", "{fx}/bad.safetensors"], "bad.safetensors", "load_pretrained"
    ),
    Case(
        "ckpt-other-norm",
        ["test", *MLP, "--model.init_args.norm", "renorm", "--ckpt_path", "{fx}/good.ckpt"],
        "good.ckpt",
        "norm: checkpoint 'bn', asked for 'renorm'",
    ),
    Case(
        "ckpt-other-model",
        ["test", *RESNET, "--ckpt_path", "{fx}/good.ckpt"],
        "good.ckpt",
        "model: checkpoint 'mlp', asked for 'resnet20'",
    ),
    Case("ckpt-registry", ["test", *MLP, "--ckpt_path", "registry:x"], "registry", "last"),
    Case(
        "fit-weights-only-false",
        ["fit", *MLP, *FAST, "--ckpt_path", "{fx}/good.ckpt", "--weights_only", "false"],
        "weights_only=False",
        "weights_only=True",
    ),
    Case(
        "fit-last-nothing-to-resume",
        ["fit", *MLP, "--ckpt_path", "last"],
        "--ckpt_path last: nothing to resume",
        "without --ckpt_path",
    ),
    Case("fit-best", ["fit", *MLP, "--ckpt_path", "best"], "--ckpt_path best", "last"),
    # bnzoo recalibrate
    Case(
        "recalibrate-zero-batches",
        ["recalibrate", *MLP, "--ckpt_path", "{fx}/good.ckpt", "--num_batches", "0"],
        "--num_batches",
        "int >= 1",
    ),
    Case(
        "recalibrate-negative-batches",
        ["recalibrate", *MLP, "--ckpt_path", "{fx}/good.ckpt", "--num_batches", "-2"],
        "--num_batches",
        "int >= 1",
    ),
    Case("recalibrate-empty", ["recalibrate", *MLP, "--ckpt_path", "{fx}/empty.ckpt"], "empty.ckpt", None),
    Case("recalibrate-truncated", ["recalibrate", *MLP, "--ckpt_path", "{fx}/truncated.ckpt"], "truncated.ckpt", None),
    Case(
        "recalibrate-other-norm",
        ["recalibrate", *MLP, "--model.init_args.norm", "renorm", "--ckpt_path", "{fx}/good.ckpt"],
        "good.ckpt",
        "norm: checkpoint 'bn', asked for 'renorm'",
    ),
    Case("recalibrate-missing", ["recalibrate", *MLP, "--ckpt_path", "{fx}/nosuch.ckpt"], "nosuch.ckpt", None),
    Case("recalibrate-no-config", ["recalibrate", "--ckpt_path", "{fx}/good.ckpt"], "--config", None),
    # bnzoo export and pretrained
    Case("export-empty", ["export", "{fx}/empty.ckpt", "-o", "out.safetensors"], "empty.ckpt", None),
    Case(
        "export-malformed-safetensors",
        ["export", "{fx}/bad.safetensors", "-o", "out.safetensors"],
        "bad.safetensors",
        "header",
    ),
    Case("export-output-suffix", ["export", "digits-mlp-bn", "-o", "out.txt"], "out.txt", ".safetensors"),
    Case("export-unknown-name", ["export", "digits-mlp-bnn"], "'digits-mlp-bnn'", "digits-mlp-bn"),
    Case("pretrained-info-unknown", ["pretrained", "info", "nope"], "'nope'", "digits-mlp-bn"),
    Case("pretrained-no-command", ["pretrained"], "required", "list"),
]


def _fixtures(folder: Path, good: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    (folder / "good.ckpt").write_bytes(data)
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    (folder / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    (folder / "bad.safetensors").write_bytes(b'\xff\xff\xff\xff\x00\x00\x00\x00{"bad')
    (folder / "malformed.yaml").write_text("trainer: [1, 2\n")
    (folder / "list.yaml").write_text("- trainer\n- model\n")
    (folder / "misspelled.yaml").write_text("traner:\n  max_epochs: 1\n")
    (folder / "a-file").write_text("not a folder\n")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("bad-inputs")
    (trained,) = run_forked([{"argv": ["fit", *MLP, *FAST], "cwd": str(work)}])
    assert trained["rc"] == 0, trained["stderr"][-3000:]
    fx = work / "fx"
    _fixtures(fx, next(work.glob("runs/digits-mlp-bn/**/last.ckpt")))
    cases = []
    for case in CASES:
        (work / case.id).mkdir()
        cases.append({"argv": [a.replace("{fx}", str(fx)) for a in case.argv], "cwd": str(work / case.id)})
    results = run_forked(cases)
    return {case.id: {**result, "fx": str(fx)} for case, result in zip(CASES, results, strict=True)}


def test_the_table_is_large_and_its_names_are_unique() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_fails_with_at_most_three_lines_naming_it(case: Case, outcomes: dict[str, dict]) -> None:
    outcome = outcomes[case.id]
    lines = outcome["stderr"].splitlines()
    shown = outcome["stderr"][-3000:]
    assert outcome["rc"] == 2, shown  # bnzoo's exit status for a refused input (bnzoo.cli.errors.run_command)
    assert 1 <= len(lines) <= 3, shown
    prog = "bnzoo" if case.id == "subcommand-unknown" else f"bnzoo {case.argv[0]}"
    assert lines[0].startswith(f"{prog}: error: "), shown
    assert case.names.replace("{fx}", outcome["fx"]) in lines[0], shown
    if case.valid is not None:
        assert case.valid in lines[0], shown
    assert "Traceback" not in outcome["stderr"] and "usage:" not in outcome["stderr"]


def _fresh(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    environment.pop("BNZOO_DEBUG", None) if "BNZOO_DEBUG" not in env else None
    return subprocess.run([sys.executable, "-m", "bnzoo.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environment)  # fmt: skip


def test_a_forked_command_behaves_as_a_fresh_process(tmp_path: Path) -> None:
    argv = ["fit", *MLP, "--model.init_args.lr", ".nan"]
    (forked,) = run_forked([{"argv": argv, "cwd": str(tmp_path)}])
    fresh = _fresh(argv, tmp_path)
    assert (forked["rc"], forked["stderr"], forked["stdout"]) == (fresh.returncode, fresh.stderr, fresh.stdout)


def test_bnzoo_debug_shows_the_traceback_and_help_shows_the_usage(tmp_path: Path) -> None:
    debug = _fresh(["fit", *MLP, "--model.init_args.lr", ".nan"], tmp_path, BNZOO_DEBUG="1")
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "lr must be a finite number > 0, got nan" in debug.stderr
    usage = _fresh(["fit", "--help"], tmp_path)
    assert usage.returncode == 0 and "usage:" in usage.stdout and "--trainer.max_epochs" in usage.stdout
