"""Run many ``bnzoo`` command lines cheaply: import bnzoo's CLI once, then fork one child process per command.

Starting ``bnzoo`` costs 3-5 s here, nearly all of it importing torch, Lightning and timm. This server pays it
once: it reads a JSON list of cases on stdin (``{"argv": [...], "cwd": "...", "env": {...}}``), forks a child for
each (``jobs`` at a time), and the child runs the console script's code -- ``sys.exit(bnzoo.cli.main())`` with
``sys.argv`` set -- with its file descriptors 1 and 2 on files of its own, exactly as a fresh ``bnzoo`` process
would write to its terminal (a Python exception the command does not handle prints its traceback and exits 1,
as the interpreter does). It prints a JSON list of ``{"rc", "stdout", "stderr", "pid"}``, one per case, in order.

    python tests/cli_forkserver.py [jobs] < cases.json

Tests call :func:`run_forked`, which starts the server as a subprocess. What keeps it from leaving anything behind:

* every child is reaped by the server (``waitpid``); a child running longer than :data:`CASE_TIMEOUT_S` is killed
  (``SIGKILL``) and reported with ``rc`` -9 and a note on its stderr; when the server itself stops early (an
  exception, a signal), it kills and reaps the children still running;
* the server runs in a session of its own, and :func:`run_forked` kills that whole process group (the server,
  its children and theirs: data-loader workers, launched ranks) whatever happens -- a timeout, an interrupted
  test -- so nothing outlives the call;
* a server that fails (non-zero exit, output that is not one result per case) is an ``AssertionError`` whose
  message holds the server's exit status and the end of its stderr.

The server opens no port. Under pytest-xdist (several test workers, each may start a server) each server runs
one command at a time unless told otherwise, so the machine is not oversubscribed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: the longest one command may run in the server before it is killed (``$BNZOO_FORKSERVER_CASE_TIMEOUT_S``)
CASE_TIMEOUT_S = float(os.environ.get("BNZOO_FORKSERVER_CASE_TIMEOUT_S", "300"))
#: the longest :func:`run_forked` waits for the whole server
SERVER_TIMEOUT_S = 1200.0


def default_jobs() -> int:
    """Commands at a time: 2, or 1 under pytest-xdist with several workers (they already run in parallel)."""
    return 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1) > 1 else 2


def run_forked(
    cases: list[dict[str, Any]], jobs: int | None = None, pythonpath: str | None = None
) -> list[dict[str, Any]]:
    """Run ``cases`` through a fork server (a subprocess; ``BNZOO_DEBUG`` unset, one thread per command, the
    repository and ``pythonpath`` importable) and return their results, one per case, in order."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), pythonpath])), "OMP_NUM_THREADS": "1"}
    env.pop("BNZOO_DEBUG", None)
    server = subprocess.Popen(
        [sys.executable, __file__, str(jobs or default_jobs())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = server.communicate(json.dumps(cases), timeout=SERVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(server)
        stdout, stderr = server.communicate()
        raise AssertionError(
            f"the fork server ran past {SERVER_TIMEOUT_S:.0f} s and was killed; its stderr ends:\n{stderr[-3000:]}"
        ) from None
    finally:
        _kill_group(server)  # whatever still runs in its session (nothing, normally)
    try:
        results = json.loads(stdout)
    except ValueError:
        results = None
    if server.returncode != 0 or not isinstance(results, list) or len(results) != len(cases):
        raise AssertionError(
            f"the fork server failed (exit status {server.returncode}, {len(stdout)} characters of output for "
            f"{len(cases)} cases); its stderr ends:\n{stderr[-3000:]}"
        )
    return results


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait()


def _serve() -> None:
    import bnzoo.cli  # noqa: F401  (the imports every child shares)
    import bnzoo.cli.recalibrate  # noqa: F401
    import bnzoo.zoo  # noqa: F401

    print(json.dumps(run_cases(json.load(sys.stdin), int(sys.argv[1]) if len(sys.argv) > 1 else 2)))


def _child(case: dict[str, Any], out: str, err: str) -> None:
    """In the forked child: run one command line and leave with its exit status (never returns)."""
    code: Any = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd, path in ((1, out), (2, err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(case["cwd"])
        os.environ.update(case.get("env") or {})
        sys.argv = ["bnzoo", *case["argv"]]
        from bnzoo.cli import main

        code = main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # what the interpreter does with an unhandled exception
        traceback.print_exc()
        code = 1
    finally:
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def run_cases(cases: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Fork a child per case, ``jobs`` at a time, reap every one, and return their results in order."""
    results: list[dict[str, Any] | None] = [None] * len(cases)
    running: dict[int, tuple[int, str, str, float]] = {}  # pid -> (case index, stdout file, stderr file, deadline)
    killed: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="bnzoo-forkserver-") as scratch:
        pending = list(enumerate(cases))
        try:
            while pending or running:
                while pending and len(running) < max(1, jobs):
                    index, case = pending.pop(0)
                    out, err = (os.path.join(scratch, f"{index}.{name}") for name in ("out", "err"))
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        _child(case, out, err)
                    running[pid] = (index, out, err, time.monotonic() + CASE_TIMEOUT_S)
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:  # none ended yet: kill the ones past their deadline, then look again
                    now = time.monotonic()
                    for late, (*_, deadline) in running.items():
                        if now > deadline and late not in killed:
                            os.kill(late, signal.SIGKILL)
                            killed.add(late)
                    time.sleep(0.02)
                    continue
                if pid not in running:
                    continue
                index, out, err, _ = running.pop(pid)
                note = f"\n[fork server: killed after {CASE_TIMEOUT_S:.0f} s]\n" if pid in killed else ""
                results[index] = {"rc": os.waitstatus_to_exitcode(status), "stdout": _read(out),
                                  "stderr": _read(err) + note, "pid": pid}  # fmt: skip
        finally:  # stopped early: no child outlives the server
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in running:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


if __name__ == "__main__":
    _serve()
