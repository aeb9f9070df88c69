"""Runs never clobber each other (:mod:`bnzoo.cli.runs`): every fresh run gets its own ``version_<N>`` folder -- also
two runs started at once and two configs with one run name --, ``--ckpt_path last`` resumes the matching run in
its own folder or says why it cannot, and a resume after ``kill -9`` leaves no temporaries nor orphaned best
checkpoints."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnzoo.cli import main
from bnzoo.cli.runs import RunLock, claim_version
from bnzoo.io import safe_torch_load

ROOT = Path(__file__).resolve().parents[1]
MLP = ["--config", str(ROOT / "configs/digits/mlp.yaml")]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "[]", "--trainer.logger.init_args.log_graph", "false"]  # fmt: skip
RUN = Path("runs/digits-mlp-bn")
NARROW = ["--model.init_args.model_options", "{activation: relu, hidden: [32]}"]  # another MLP, the same run name


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def fit(*args: str) -> Path:
    """``bnzoo fit`` in this process; returns the ``last checkpoint:`` it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit", *MLP, *QUICK, *args]) == 0
    return Path(re.search(r"^last checkpoint: (.+)$", out.getvalue(), re.MULTILINE).group(1))


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``bnzoo fit`` that must fail; returns its stderr (at most three lines)."""
    capsys.readouterr()
    assert main(["fit", *MLP, *QUICK, *args]) == 2
    err = capsys.readouterr().err
    assert 1 <= len(err.splitlines()) <= 3, err
    return err


def test_two_fresh_runs_of_one_config_keep_their_own_folders() -> None:
    first, second = fit(), fit()
    assert (first, second) == (RUN / "version_0/checkpoints/last.ckpt", RUN / "version_1/checkpoints/last.ckpt")
    for version in (0, 1):
        folder = RUN / f"version_{version}"
        assert (folder / "checkpoints/last.ckpt").is_file() and list(folder.glob("events.out.tfevents.*"))
        best = next(s for s in safe_torch_load(folder / "checkpoints/last.ckpt")["callbacks"].values() if s["monitor"])
        assert Path(best["best_model_path"]).parent == folder / "checkpoints"  # its own best, in its own folder


def test_two_configs_with_one_name_keep_separate_runs_and_last_resumes_the_matching_one() -> None:
    wide = fit()
    narrow = fit(*NARROW)
    assert wide.parent != narrow.parent
    narrow_bytes = narrow.read_bytes()
    stopped = safe_torch_load(wide)
    resumed = fit("--ckpt_path", "last", "--trainer.max_epochs", "2")  # the default (wide) config again
    assert resumed == wide  # the same run, continued in its folder (not the later, narrow one)
    after = safe_torch_load(wide)
    assert (after["epoch"], after["global_step"]) == (1, 2 * stopped["global_step"])
    shapes = {key: value.shape for key, value in stopped["state_dict"].items()}
    assert {key: value.shape for key, value in after["state_dict"].items()} == shapes  # the wide MLP's weights
    assert narrow.read_bytes() == narrow_bytes  # the other run is untouched
    assert sorted(p.name for p in RUN.iterdir()) == ["version_0", "version_1"]  # no new folder for the resume
    assert len(list((RUN / "version_0").glob("events.out.tfevents.*"))) == 2  # its logs continue there


def test_a_resume_under_an_incompatible_config_is_refused_naming_the_difference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fit()  # relu
    err = fails(capsys, "--model.init_args.model_options", "{activation: sigmoid}", "--ckpt_path", "last")
    assert "--ckpt_path last: no run of runs/digits-mlp-bn fits this config" in err
    assert "activation: checkpoint 'relu', asked for 'sigmoid'" in err
    err = fails(capsys, "--data.init_args.normalization", "none", "--ckpt_path", "last")
    assert "data normalization: checkpoint 'dataset', asked for 'none'" in err
    assert sorted(p.name for p in RUN.iterdir()) == ["version_0"]


def test_last_with_nothing_to_resume_says_so_and_creates_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, "--ckpt_path", "last")
    assert "--ckpt_path last: nothing to resume" in err and "run without --ckpt_path to start a fresh run" in err
    assert not Path("runs").exists()


def test_a_run_in_use_cannot_be_resumed(capsys: pytest.CaptureFixture[str]) -> None:
    fit()
    lock = RunLock(RUN / "version_0")  # as a process still training it would
    try:
        err = fails(capsys, "--ckpt_path", "last", "--trainer.max_epochs", "2")
        assert f"runs/digits-mlp-bn/version_0 is in use by another bnzoo process (pid {os.getpid()})" in err
    finally:
        lock.release()
    assert fit("--ckpt_path", "last", "--trainer.max_epochs", "2") == RUN / "version_0/checkpoints/last.ckpt"


def test_a_resume_after_kill_sweeps_temporaries_and_orphaned_best_checkpoints() -> None:
    last = fit("--trainer.max_epochs", "2")
    folder = last.parent
    (listed,) = folder.glob("best-*.ckpt")
    # what kill -9 leaves: half-written temporaries, a best file written after the last.ckpt that was saved, and
    # (its save removed the previous best) a listed best that is gone
    (folder / ".last.ckpt.k1ll3d.tmp").write_bytes(b"partial")
    (folder / ".best-epoch002-step9.ckpt.x9y8z7.tmp").write_bytes(b"partial")
    (folder / "best-epoch002-step9.ckpt").write_bytes(listed.read_bytes())
    listed.unlink()
    fit("--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert not list(folder.glob("*.tmp"))
    state = next(s for s in safe_torch_load(last)["callbacks"].values() if s["monitor"])
    on_disk = {p.resolve() for p in folder.glob("best-*.ckpt")}
    assert on_disk == {Path(p).resolve() for p in state["best_k_models"]} and len(on_disk) == 1
    assert Path(state["best_model_path"]).is_file()


def test_validate_and_test_take_last_and_best_from_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    last = fit("--trainer.max_epochs", "2")
    capsys.readouterr()
    printed = {}
    for which in ("last", "best", str(last)):
        assert main(["test", *MLP, "--trainer.enable_progress_bar", "false", "--ckpt_path", which]) == 0
        printed[which] = re.search(r"test/acc: (\S+)", capsys.readouterr().out).group(1)
    assert printed["last"] == printed[str(last)]
    best = next(s for s in safe_torch_load(last)["callbacks"].values() if s["monitor"])["best_model_path"]
    assert Path(best).is_file() and printed["best"]


def _claim(root: str, start: object, claimed: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    claimed.put(claim_version(Path(root)))  # type: ignore[attr-defined]


def test_concurrent_claims_get_distinct_versions(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    start, claimed = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path / "run"), start, claimed)) for _ in range(6)]
    for worker in workers:
        worker.start()
    numbers = sorted(claimed.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert numbers == list(range(6))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [f"version_{n}" for n in range(6)]


@pytest.mark.slow
def test_two_runs_started_at_once_never_share_a_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bnzoo.cli", "fit", *MLP, *QUICK]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]  # fmt: skip
    try:
        outputs = [run.communicate(timeout=600) for run in runs]
    finally:  # a run that hangs is not left behind
        for run in runs:
            run.kill()
            run.wait()
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    printed = {re.search(r"^last checkpoint: (.+)$", out, re.MULTILINE).group(1) for out, _ in outputs}
    assert printed == {f"{RUN}/version_0/checkpoints/last.ckpt", f"{RUN}/version_1/checkpoints/last.ckpt"}
    for path in printed:
        assert torch.load(tmp_path / path, weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_runs_killed_with_sigkill_resume_with_consistent_checkpoints(tmp_path: Path) -> None:
    """The real thing: a run killed with ``kill -9`` at random moments (three times, once its first ``last.ckpt``
    exists), resumed with ``--ckpt_path last`` after each kill, finishes in its own folder with no temporary file
    left and exactly the best checkpoints its bookkeeping lists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    many = ["--trainer.max_epochs", "60", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    command = [sys.executable, "-m", "bnzoo.cli", "fit", *MLP, *QUICK, *many]
    last = tmp_path / RUN / "version_0/checkpoints/last.ckpt"
    rng = random.Random(12)
    for attempt in range(4):
        resume = ["--ckpt_path", "last"] if attempt else []
        run = subprocess.Popen([*command, *resume], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            if attempt < 3:
                before = last.stat().st_mtime_ns if last.exists() else None
                deadline = time.monotonic() + 120
                while (not last.exists() or last.stat().st_mtime_ns == before) and run.poll() is None:
                    assert time.monotonic() < deadline, "no new last.ckpt within 120 s"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the following epochs: maybe in the middle of a save
                run.kill()
            _, err = run.communicate(timeout=600)
        finally:
            run.kill()
            run.wait()
        if attempt == 3:
            assert run.returncode == 0, err[-3000:]
    folder = last.parent
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == ["version_0"]  # every resume continued there
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
    final = safe_torch_load(last)
    assert final["epoch"] == 59
    state = next(s for s in final["callbacks"].values() if s["monitor"])
    on_disk = {p.resolve() for p in folder.glob("best-*.ckpt")}
    assert on_disk == {Path(p).resolve() for p in state["best_k_models"]} and len(on_disk) == 1
    assert Path(state["best_model_path"]).resolve() in on_disk
