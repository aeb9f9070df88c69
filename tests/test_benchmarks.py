"""Every benchmark runs (in its --quick mode) and prints its table: benchmarks must not rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in {"__init__", "timing"})


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_mode_prints_a_table(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|---" in result.stdout, result.stdout[-2000:]
