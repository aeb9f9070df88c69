"""The fork server the command-line tests use (``tests/cli_forkserver.py``) leaves nothing behind and fails
readably: every child is reaped, a command past its deadline is killed and reported, a broken server is an
assertion naming its exit status and stderr."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from tests import cli_forkserver
from tests.cli_forkserver import run_forked

ROOT = Path(__file__).resolve().parents[1]
LONG_FIT = ["fit", "--config", str(ROOT / "configs/digits/mlp.yaml"), "--trainer.max_epochs", "1000",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_command_past_its_deadline_is_killed_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNZOO_FORKSERVER_CASE_TIMEOUT_S", "3")
    cases = [{"argv": LONG_FIT, "cwd": str(tmp_path)}, {"argv": ["pretrained", "list"], "cwd": str(tmp_path)},
             {"argv": ["pretrained", "info", "nope"], "cwd": str(tmp_path)}]  # fmt: skip
    late, listed, unknown = run_forked(cases, jobs=2)
    assert late["rc"] == -9 and late["stderr"].endswith("[fork server: killed after 3 s]\n")
    assert listed["rc"] == 0 and "digits-mlp-bn" in listed["stdout"]
    assert unknown["rc"] == 2 and "'nope'" in unknown["stderr"]
    assert not any(_alive(result["pid"]) for result in (late, listed, unknown))  # reaped, none left running


def test_a_failing_server_is_an_assertion_with_its_exit_status_and_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken_server.py"
    broken.write_text(
        textwrap.dedent("""
        import sys
        sys.stdin.read()
        print("[]")
        sys.exit("the server broke: no bnzoo here")
    """)
    )
    monkeypatch.setattr(cli_forkserver, "__file__", str(broken))
    with pytest.raises(AssertionError, match=r"(?s)exit status 1.*for 1 cases.*the server broke: no bnzoo here"):
        run_forked([{"argv": ["pretrained", "list"], "cwd": str(tmp_path)}])


def test_a_server_past_its_deadline_is_killed_with_its_whole_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that hangs (here: one that starts a grandchild and sleeps) is killed at the deadline together with
    everything in its session."""
    pid_file = tmp_path / "grandchild.pid"
    hanging = tmp_path / "hanging_server.py"
    hanging.write_text(
        textwrap.dedent(f"""
        import subprocess, sys, time
        sys.stdin.read()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("server is hanging", file=sys.stderr, flush=True)
        time.sleep(600)
    """)
    )
    monkeypatch.setattr(cli_forkserver, "__file__", str(hanging))
    monkeypatch.setattr(cli_forkserver, "SERVER_TIMEOUT_S", 3.0)
    with pytest.raises(AssertionError, match=r"(?s)ran past 3 s and was killed.*server is hanging"):
        run_forked([{"argv": ["pretrained", "list"], "cwd": str(tmp_path)}])
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10  # the grandchild, reparented to init, is reaped there shortly after its kill
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
