"""Shared timing for bnzoo's benchmarks: interleaved rounds, medians, and ratios to a baseline of the same run.

Each candidate is timed in rounds that alternate between candidates (so a slow spell of the machine hits them
all alike), every round runs the callable enough times to last about ``round_s`` seconds, and the figure is
the median round. Ratios are taken against the baseline *measured in the same run*.

``BNZOO_BENCH_CLOCK=thread`` times with the calling thread's CPU time (``time.thread_time``) instead of the
wall clock: on a machine shared with other jobs it leaves out the time the process waits for a core. Use it
with ``OMP_NUM_THREADS=1`` (other threads' work is not counted); CPU autograd runs on the calling thread.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["clock_name", "compare", "format_table", "machine_line"]

_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def clock_name() -> str:
    """The clock named by ``BNZOO_BENCH_CLOCK`` ("wall", the default, or "thread"); a ValueError otherwise."""
    name = os.environ.get("BNZOO_BENCH_CLOCK", "wall")
    if name not in _CLOCKS:
        raise ValueError(f"BNZOO_BENCH_CLOCK must be one of {sorted(_CLOCKS)}, got {name!r}")
    return name


def _calibrate(fn: Callable[[], object], round_s: float, clock: Callable[[], float]) -> int:
    fn()  # warm-up (allocator, lazy init)
    start = clock()
    fn()
    once = max(clock() - start, 1e-6)
    return max(1, int(round_s / once))


def compare(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int = 15,
    round_s: float = 0.05,
    clock: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    ``clock``: by default the one ``BNZOO_BENCH_CLOCK`` names (wall time unless set); ``time.process_time`` or
    ``time.thread_time`` (CPU seconds) leave out the time the process waits for a core, which on a shared,
    overloaded machine is most of the wall time (meaningful with one thread on the CPU only, none of a GPU's)."""
    clock = clock or _CLOCKS[clock_name()]
    reps = {name: _calibrate(fn, round_s, clock) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = clock()
            for _ in range(reps[name]):
                fn()
            samples[name].append((clock() - start) / reps[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def format_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given ``columns``."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line naming the machine, for the results file."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {device}, clock {clock_name()}"
    )
