"""Run many ``bnzoo`` command lines cheaply: import bnzoo's CLI once, then fork one child process per command.

Starting ``bnzoo`` costs 3-5 s here, nearly all of it importing torch, Lightning and timm. This server pays it
once: it reads a JSON list of cases on stdin (``{"argv": [...], "cwd": "...", "env": {...}}``), forks a child for
each (``jobs`` at a time), and the child runs the console script's code -- ``sys.exit(bnzoo.cli.main())`` with
``sys.argv`` set -- with its file descriptors 1 and 2 on files of its own, exactly as a fresh ``bnzoo`` process
would write to its terminal (a Python exception the command does not handle prints its traceback and exits 1,
as the interpreter does). It prints a JSON list of ``{"rc", "stdout", "stderr"}``, one per case, in order.

    python tests/cli_forkserver.py [jobs] < cases.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from typing import Any

import bnzoo.cli  # noqa: F401  (the import every child shares)
import bnzoo.hub  # noqa: F401
import bnzoo.recalibrate_command  # noqa: F401


def _child(case: dict[str, Any], out: str, err: str) -> None:
    """In the forked child: run one command line and leave with its exit status (never returns)."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    code: Any = 0
    try:
        os.chdir(case["cwd"])
        os.environ.update(case.get("env") or {})
        sys.argv = ["bnzoo", *case["argv"]]
        code = bnzoo.cli.main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # what the interpreter does with an unhandled exception
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cases(cases: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(cases)
    running: dict[int, tuple[int, str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bnzoo-forkserver-") as scratch:
        pending = list(enumerate(cases))
        while pending or running:
            while pending and len(running) < jobs:
                index, case = pending.pop(0)
                out, err = (os.path.join(scratch, f"{index}.{name}") for name in ("out", "err"))
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(case, out, err)
                running[pid] = (index, out, err)
            pid, status = os.wait()
            index, out, err = running.pop(pid)
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                results[index] = {
                    "rc": os.waitstatus_to_exitcode(status),
                    "stdout": f_out.read(),
                    "stderr": f_err.read(),
                }
    return [r for r in results if r is not None]


if __name__ == "__main__":
    print(json.dumps(run_cases(json.load(sys.stdin), int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
