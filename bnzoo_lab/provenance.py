"""Where a result came from: the code, the experiment's setup and the packages that made it, and whether the
current ones still are those.

:func:`collect` is stored with every results file (``"provenance"``): the git commit and whether the work tree
had uncommitted changes, a hash of the sources that make the runs (every ``.py`` of ``bnzoo`` and of ``bnzoo_lab``
except the modules that only judge and draw, :data:`REPORT_ONLY`), the experiment's hashes and the versions of
python, torch, lightning, timm and numpy. :func:`staleness` compares a results file with the code and spec of
now: a result made by other code or with another setup of its experiment is *stale* (the report marks it, and
refuses it with ``--strict``); one whose spec changed only in its findings or text is judged with the findings
stored with it.

Two hashes of an experiment (sha256 of canonical JSON): ``spec_hash`` of its whole ``experiment.yaml`` and base
config, ``setup_hash`` of what decides the runs (the base config and the keys :data:`SETUP_KEYS`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

import bnzoo

from .spec import ExperimentSpec

__all__ = ["REPORT_ONLY", "SETUP_KEYS", "collect", "git_state", "source_hash", "spec_hashes", "staleness"]

#: bnzoo_lab modules that judge, draw and write reports: they do not change a result, so not in the source hash
REPORT_ONLY = ("cli.py", "figures.py", "formatting.py", "metrics.py", "provenance.py", "report.py", "stats.py",
               "zoo_build.py")  # fmt: skip
#: the keys of an experiment.yaml that decide its runs (with the base config)
SETUP_KEYS = ("config", "seeds", "quick_seeds", "variants", "quick", "measure", "test_batches", "recalibration")
PACKAGES = ("torch", "lightning", "timm", "numpy")


def _packages() -> dict[str, Path]:
    return {"bnzoo": Path(bnzoo.__file__).parent, "bnzoo_lab": Path(__file__).parent}


def source_hash() -> str:
    """sha256 over the path and bytes of every source that makes a run (see the module docstring)."""
    digest = hashlib.sha256()
    for package, folder in _packages().items():
        for path in sorted(folder.rglob("*.py")):
            if package == "bnzoo_lab" and path.name in REPORT_ONLY:
                continue
            digest.update(f"{package}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository bnzoo is imported from (None outside
    a git checkout, e.g. an installed wheel); dirty = uncommitted changes to bnzoo, bnzoo_lab or configs."""
    root = _packages()["bnzoo"].parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "bnzoo", "bnzoo_lab",
                                 "configs"], capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def spec_hashes(spec: ExperimentSpec) -> dict[str, str]:
    """``{"spec_hash", "setup_hash"}`` of the experiment's files as they are now (see the module docstring)."""
    raw = yaml.safe_load((spec.folder / "experiment.yaml").read_text()) or {}
    base = spec.base_config()
    return {
        "spec_hash": _hash({"experiment": raw, "base": base}),
        "setup_hash": _hash({"setup": {k: raw.get(k) for k in SETUP_KEYS}, "base": base}),
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(spec: ExperimentSpec) -> dict[str, Any]:
    """The provenance record stored with a results file."""
    versions = {"python": platform.python_version(), "bnzoo": bnzoo.__version__}
    versions |= {name: _version(name) for name in PACKAGES}
    return {**git_state(), "source_hash": source_hash(), **spec_hashes(spec), "versions": versions}


def staleness(stored: dict[str, Any] | None, spec: ExperimentSpec | None, current_source: str) -> list[str]:
    """Why a result no longer describes the code and spec of now (empty: it does). ``spec`` is the experiment's
    current spec (None when its folder is gone), ``current_source`` the :func:`source_hash` of now."""
    if not stored:
        return ["no provenance (made before results recorded their code and spec)"]
    reasons = []
    if stored.get("source_hash") != current_source:
        commit = (stored.get("commit") or "unknown")[:10]
        reasons.append(f"made by other code (commit {commit}{', uncommitted changes' if stored.get('dirty') else ''})")
    if spec is None:
        reasons.append("its experiment no longer exists")
    elif stored.get("setup_hash") != spec_hashes(spec)["setup_hash"]:
        reasons.append("made with another setup of the experiment (config, variants or seeds changed since)")
    return reasons
