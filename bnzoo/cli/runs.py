"""Run folders: every fresh run gets a folder of its own; a resumed run continues in its own.

Layout (``<root>`` is the logger's ``save_dir``, ``runs/`` by default, or the trainer's ``default_root_dir``
without a logger; ``<name>`` the logger's name, ``<dataset>-<model>-<norm>`` by default)::

    <root>/<name>/version_<N>/              one run: TensorBoard events, hparams.yaml, config.yaml
    <root>/<name>/version_<N>/checkpoints/  its last.ckpt and best-*.ckpt

* A fresh run *claims* the next ``version_<N>`` with ``os.mkdir``, which exactly one process can do: two runs
  started at once, or two configs with the same run name, never share a folder (:func:`claim_version`).
* While it runs, the process holds an exclusive lock on ``version_<N>/.bnzoo-run.lock`` (:class:`RunLock`), so a
  second process cannot resume -- and write into -- a run that is still going.
* ``--ckpt_path last`` resumes the latest version of the name whose ``last.ckpt`` is compatible with the config
  (:mod:`bnzoo.zoo.compatibility`), and continues in its folder (:func:`find_resumable`); with nothing to resume it is
  an error, never a silent fresh start.

Under multi-process launches only the process of global rank 0 claims and locks (:func:`is_launch_rank_zero`);
the others receive its checkpoint folder from Lightning's broadcast.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning as L

from ..data.registry import IMAGE_DATAMODULES
from ..io import safe_torch_load
from ..zoo.compatibility import IncompatibleCheckpointError

__all__ = [
    "CHECKPOINTS",
    "LAST",
    "NothingToResumeError",
    "RunInUseError",
    "RunLock",
    "claim_version",
    "find_resumable",
    "is_launch_rank_zero",
    "run_version_of",
    "versions",
]

VERSION_PREFIX = "version_"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
LOCK_FILE = ".bnzoo-run.lock"

_VERSION = re.compile(rf"^{VERSION_PREFIX}(\d+)$")
#: the environment variables a launcher (Lightning, torchrun, SLURM, MPI) sets to a process's rank
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class NothingToResumeError(FileNotFoundError):
    """``--ckpt_path last`` found no checkpoint of the run to resume."""


class RunInUseError(RuntimeError):
    """Another process is writing into the run folder."""


def is_launch_rank_zero() -> bool:
    """Whether this process is (or will be) global rank 0: every rank variable a launcher sets is absent or 0."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def versions(run_root: Path) -> list[tuple[int, Path]]:
    """The ``version_<N>`` folders of ``run_root``, by ``N``."""
    if not run_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
    return sorted(found)


def claim_version(run_root: Path) -> int:
    """Create and return the next free ``version_<N>`` of ``run_root``. ``os.mkdir`` is atomic: of several
    processes claiming at once each gets its own ``N``."""
    run_root.mkdir(parents=True, exist_ok=True)
    number = versions(run_root)[-1][0] + 1 if versions(run_root) else 0
    while True:
        try:
            (run_root / f"{VERSION_PREFIX}{number}").mkdir()
            return number
        except FileExistsError:
            number += 1


def run_version_of(path: str | os.PathLike[str], run_root: Path) -> int | None:
    """``N`` when ``path`` is a file of ``<run_root>/version_<N>/checkpoints/``, else None."""
    resolved = Path(path).resolve()
    folder = resolved.parent
    if folder.name != CHECKPOINTS or folder.parent.parent != run_root.resolve():
        return None
    match = _VERSION.match(folder.parent.name)
    return int(match.group(1)) if match else None


def find_resumable(
    run_root: Path, differences: Callable[[Path], list[str]], version: str | None = None
) -> tuple[int | str, Path]:
    """(N, ``last.ckpt``) of the latest ``version_<N>`` of ``run_root`` whose ``last.ckpt`` is compatible
    (``differences(path)`` is empty); with ``version`` (a folder name the logger config fixes) that folder only.
    No ``last.ckpt`` at all is a :class:`NothingToResumeError`; only incompatible ones an
    :class:`IncompatibleCheckpointError` naming the latest one and its differences."""
    folders: list[tuple[int | str, Path]] = (
        [(version, run_root / version)] if version is not None else list(reversed(versions(run_root)))
    )
    candidates = [(n, folder / CHECKPOINTS / LAST) for n, folder in folders]
    candidates = [(n, path) for n, path in candidates if path.is_file()]
    if not candidates:
        legacy = run_root / CHECKPOINTS / LAST
        hint = f" ({legacy} is from an older bnzoo: pass it as --ckpt_path)" if legacy.is_file() else ""
        pattern = version or f"{VERSION_PREFIX}*"
        raise NothingToResumeError(
            f"--ckpt_path last: nothing to resume, no {run_root}/{pattern}/{CHECKPOINTS}/{LAST}{hint}; run without "
            "--ckpt_path to start a fresh run"
        )
    latest: tuple[Path, list[str]] | None = None
    for number, path in candidates:
        found = differences(path)
        if not found:
            return number, path
        latest = latest or (path, found)
    assert latest is not None
    raise IncompatibleCheckpointError(
        f"--ckpt_path last: no run of {run_root} fits this config; the latest, {latest[0]}, differs in "
        f"{'; '.join(latest[1])}. Resume it with its own config, or run without --ckpt_path to start a fresh run"
    )


class RunLock:
    """An exclusive ``flock`` on ``<version folder>/.bnzoo-run.lock`` (holding this process's id), held until
    :meth:`release` (the CLI releases it when its subcommand ends) or the process ends; a folder locked by another
    process is a :class:`RunInUseError`."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._file: IO[str] | None = open(self.path, "a+")  # noqa: SIM115 (held while the run lives)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise RunInUseError(
                f"{folder} is in use by another bnzoo process (pid {owner}); wait for it to end, or run without "
                "--ckpt_path to start a fresh run"
            ) from err
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


#: a logger ``name`` of "auto" becomes ``<dataset>-<model>-<norm>``, e.g. ``fashion_mnist-resnet20-renorm``
AUTO_NAME = "auto"


def best_of(last: Path) -> str:
    """The best checkpoint a run recorded in its ``last.ckpt`` (the top-k callback's ``best_model_path``)."""
    states = (safe_torch_load(last).get("callbacks") or {}).values()
    best = next((s.get("best_model_path") for s in states if isinstance(s, dict) and s.get("monitor")), None)
    if not best or not Path(best).is_file():
        raise FileNotFoundError(f"--ckpt_path best: the run of {last} has no best checkpoint file ({best or 'none'})")
    return str(best)


def run_name(config: Any) -> str:
    """``<dataset>-<model>-<norm>`` from a parsed config, e.g. ``fashion_mnist-resnet20-renorm``; sequence tasks
    add their mode, e.g. ``fashion_mnist_row-ds2_gru-bn``; a timm model's ``/`` becomes ``-`` (one folder:
    ``digits-timm-resnet18-renorm``)."""
    data = config.get("data") or {}
    data_class = str(data.get("class_path", "")).rsplit(".", 1)[-1]
    names = {cls.__name__: name for name, cls in IMAGE_DATAMODULES.items()}
    init = data.get("init_args") or {}
    if data_class in names:
        dataset = names[data_class]
    elif "dataset" in init:
        dataset = f"{init['dataset']}_{init.get('mode', 'seq')}"
    else:
        dataset = data_class.removesuffix("DataModule").lower() or "data"
    model = (config.get("model") or {}).get("init_args") or {}
    network = str(model.get("model", "model")).replace("/", "-")
    return f"{dataset}-{network}-{model.get('norm', 'norm')}"


def run_logger_args(config: Any) -> Any:
    """The ``init_args`` of the config's (first) logger when it lays out runs as ``<save_dir>/<name>/<version>``
    (TensorBoard, CSV), else None."""
    logger = (config.get("trainer") or {}).get("logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    init_args = getattr(first, "init_args", None)
    if init_args is not None and "save_dir" in init_args and "version" in init_args and "name" in init_args:
        return init_args
    return None


def run_root(config: Any, name: str) -> Path:
    """``<save_dir>/<logger name>`` (an ``auto`` logger name becomes ``name``), or ``<default_root_dir>/<name>``
    without such a logger: the folder of the run's versions."""
    logger_args = run_logger_args(config)
    trainer = config.get("trainer") or {}
    if logger_args is None:
        return Path(trainer.get("default_root_dir") or "runs") / name
    if logger_args.get("name") == AUTO_NAME:
        logger_args["name"] = name
    return Path(logger_args.get("save_dir") or trainer.get("default_root_dir") or ".") / str(logger_args["name"] or "")


def explicit_version(config: Any) -> str | None:
    """The folder name of a version the logger config fixes (``version: 3`` -> ``version_3``, ``seed0``), or None."""
    logger_args = run_logger_args(config)
    version = None if logger_args is None else logger_args.get("version")
    if version is None:
        return None
    return version if isinstance(version, str) else f"version_{version}"


def place_checkpoints(trainer: L.Trainer, run_dir: Path | None, name: str) -> None:
    """Point checkpoint callbacks without a folder at ``<run folder>/checkpoints``. Where no run folder was
    prepared (other ranks: Lightning broadcasts rank 0's; ``run=False``): the logger's folder, or
    ``<default_root_dir>/<name>/checkpoints`` without a logger -- never the working directory's ``checkpoints/``
    (in this repository, the pretrained zoo)."""
    if run_dir is not None:
        folder = str(run_dir / CHECKPOINTS)
    elif trainer.logger is None:
        folder = os.path.join(trainer.default_root_dir, name, CHECKPOINTS)
    else:
        return
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is None:
            callback.dirpath = folder
