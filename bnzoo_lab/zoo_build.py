"""Build the pretrained zoo: train each ``configs/pretrained/<name>.yaml``, publish it to ``checkpoints/``.

    python -m bnzoo.zoo_build fit fashion_mnist-resnet20-bn      # train (bnzoo fit), record steps and time
    python -m bnzoo.zoo_build publish fashion_mnist-resnet20-bn  # strip, test (bnzoo test), hash, index.json
    python -m bnzoo.zoo_build all                                # both, for every config

Every step is the ``bnzoo`` command a user would run, in a subprocess, so what is published is what
``bnzoo test --config configs/pretrained/<name>.yaml --ckpt_path <name>`` reproduces:

1. ``fit``: ``bnzoo fit --config configs/pretrained/<name>.yaml`` into ``<workdir>/<name>/`` (the run name of a
   config is ``<dataset>-<model>-<norm>``, which is why each config file is named after its run). The wall
   time of the whole command (data loading, validation and the final recalibration included), the optimizer
   steps and the epochs go to ``<workdir>/<name>/fit.json``.
2. ``publish``: the run's ``last.ckpt`` (the final, recalibrated weights, in the run's ``version_<N>/checkpoints/``
   as ``bnzoo fit`` printed it) without optimizer, scheduler, loop
   and callback state is written to ``checkpoints/<name>.ckpt``; ``bnzoo test`` on that file measures the test
   accuracy on the whole test set and on its first ``FIXED_BATCH`` images (``--data.init_args.batch_size 100
   --trainer.limit_test_batches 10``); its sha256, size and all of the above become its entry in
   ``checkpoints/index.json``, and the README's zoo table is rendered from that index
   (:func:`bnzoo.zoo.zoo_table`).

The threads each command uses come from ``OMP_NUM_THREADS`` (the zoo was built with 1 thread per run, two
runs side by side on a shared 2-core CPU; the wall times in the index are that machine's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml

from bnzoo import __version__
from bnzoo.io import atomic_torch_save, atomic_write_bytes, safe_torch_load
from bnzoo.models.registry import build_model
from bnzoo.resources import checkpoint_dir, config_dir
from bnzoo.zoo.compatibility import network_options
from bnzoo.zoo.fetch import file_sha256
from bnzoo.zoo.index import CHECKPOINT_SUFFIX, INDEX_FORMAT, index_lock, read_index, write_index

__all__ = ["FIXED_BATCH", "KEPT_CHECKPOINT_KEYS", "fit", "main", "publish", "strip_checkpoint"]

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = config_dir() / "pretrained"

#: the test images every entry also reports an accuracy on (the first ones of the test set, in file order), so
#: that tests can check a checkpoint quickly; a smaller test set is used whole
FIXED_BATCH = 1000

#: what a published checkpoint keeps of a Lightning checkpoint: enough for ``bnzoo test --ckpt_path`` and
#: :func:`bnzoo.load_pretrained`, nothing needed only to resume training
KEPT_CHECKPOINT_KEYS = (
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "hparams_name",
    "hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hyper_parameters",
)

_LAST_LINE = re.compile(r"^last checkpoint: (.+\.ckpt)$", re.MULTILINE)
_METRIC_LINE = re.compile(r"^(test/[a-z_0-9]+): ([0-9.]+)$", re.MULTILINE)


def config_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")))
        raise ValueError(f"no config {path}; valid names: {valid}")
    return path


def _bnzoo(args: Sequence[str], log: Path) -> str:
    """Run ``bnzoo <args>`` in a subprocess from the repository root; its output goes to ``log`` and is
    returned. A failure raises with the log's tail."""
    command = [sys.executable, "-m", "bnzoo.cli", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ bnzoo " + " ".join(args) + "\n")
        out.flush()
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if result.returncode != 0:
        raise RuntimeError(f"bnzoo {args[0]} failed (exit {result.returncode}); see {log}:\n{text[-3000:]}")
    return text


def fit(name: str, workdir: Path) -> dict[str, Any]:
    """Train ``configs/pretrained/<name>.yaml``; returns (and writes to ``<workdir>/<name>/fit.json``) the
    optimizer steps, epochs and wall time of the run."""
    config = config_path(name)
    run_dir = workdir / name
    start = time.perf_counter()
    printed = _bnzoo(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.logger.init_args.save_dir",
            str(workdir),
            "--trainer.enable_progress_bar",
            "false",
        ],
        run_dir / "fit.log",
    )
    wall_time = time.perf_counter() - start
    found = _LAST_LINE.search(printed)
    last = ROOT / found.group(1) if found else None  # the run's own version folder (bnzoo.runs)
    if last is None or not last.is_file() or last.resolve().parents[2] != run_dir.resolve():
        raise RuntimeError(f"{config} did not produce a last.ckpt under {run_dir}: is the config's run name {name!r}?")
    checkpoint = safe_torch_load(last)
    record = {
        "last_checkpoint": str(last.relative_to(workdir)),
        "steps": int(checkpoint["global_step"]),
        "epochs": int(checkpoint["epoch"]) + 1,
        "wall_time_s": round(wall_time, 1),
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs)",
    }
    atomic_write_bytes(run_dir / "fit.json", json.dumps(record, indent=2).encode())
    return record


def strip_checkpoint(checkpoint: dict[str, Any], name: str, dataset: str) -> dict[str, Any]:
    """The published form of a Lightning checkpoint: :data:`KEPT_CHECKPOINT_KEYS` plus ``bnzoo_pretrained``
    (the entry's name and dataset), every value a plain type or a tensor."""
    missing = [key for key in ("state_dict", "hyper_parameters") if key not in checkpoint]
    if missing:
        raise ValueError(f"not a Lightning checkpoint of a bnzoo task: no {', '.join(missing)}")
    stripped = {key: checkpoint[key] for key in KEPT_CHECKPOINT_KEYS if key in checkpoint}
    # a clone owns its storage: a tensor that is a view saves only its own elements
    stripped["state_dict"] = {key: value.detach().clone() for key, value in checkpoint["state_dict"].items()}
    stripped["bnzoo_pretrained"] = {"name": name, "dataset": dataset}
    return stripped


def _test_metrics(config: Path, ckpt: Path, log: Path, workdir: Path, *extra: str) -> dict[str, float]:
    text = _bnzoo(
        [
            "test",
            "--config",
            str(config),
            "--ckpt_path",
            str(ckpt),
            "--trainer.logger.init_args.save_dir",
            str(workdir / "test"),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ],
        log,
    )
    metrics = {key: float(value) for key, value in _METRIC_LINE.findall(text)}
    if "test/acc" not in metrics:
        raise RuntimeError(f"bnzoo test printed no test/acc; see {log}")
    return metrics


def _dataset_name(name: str) -> str:
    return name.split("-", 1)[0]


def publish(name: str, workdir: Path, destination: Path | None = None) -> dict[str, Any]:
    """Strip, test, hash and index the run ``<workdir>/<name>``; returns its index entry."""
    destination = destination or checkpoint_dir()
    config = config_path(name)
    run_dir = workdir / name
    trained = json.loads((run_dir / "fit.json").read_text())
    checkpoint = safe_torch_load(workdir / trained["last_checkpoint"])
    file_name = f"{name}{CHECKPOINT_SUFFIX}"
    target = destination / file_name
    atomic_torch_save(strip_checkpoint(checkpoint, name, _dataset_name(name)), target)

    full = _test_metrics(config, target, run_dir / "test.log", workdir)
    fixed = _test_metrics(
        config,
        target,
        run_dir / "test_fixed.log",
        workdir,
        "--data.init_args.batch_size",
        "100",
        "--trainer.limit_test_batches",
        str(FIXED_BATCH // 100),
    )
    hparams = checkpoint["hyper_parameters"]
    num_test = _test_set_size(config)
    entry = {
        "name": name,
        "file": file_name,
        "model": hparams["model"],
        "model_options": dict(hparams.get("model_options") or {}),
        "norm": hparams["norm"],
        "norm_options": dict(hparams.get("norm_options") or {}),
        "task": hparams.get("_class_path", ""),
        "create_options": network_options(hparams),
        "dataset": _dataset_name(name),
        "config": str(config.relative_to(ROOT)),
        "params": sum(p.numel() for p in build_model(hparams["model"], **network_options(hparams)).parameters()),
        "train": {k: v for k, v in trained.items() if k != "last_checkpoint"},
        "test": {
            "acc": full["test/acc"],
            "loss": full.get("test/loss"),
            "acc_top5": full.get("test/acc_top5"),
            "images": num_test,
            "fixed_batch_images": min(FIXED_BATCH, num_test),
            "fixed_batch_acc": fixed["test/acc"],
        },
        "sha256": file_sha256(target),
        "size_bytes": target.stat().st_size,
        "versions": {"bnzoo": __version__, "torch": torch.__version__, "lightning": lightning.__version__},
    }
    with index_lock(destination):
        entries = {e["name"]: e for e in read_index(destination)}
        entries[name] = entry
        write_index(sorted(entries.values(), key=lambda e: _zoo_order(e["name"])), destination)
    return entry


def _zoo_order(name: str) -> tuple[int, str]:
    """Fashion-MNIST entries first (the default of ``build_model(..., pretrained=True)``), then the others."""
    return (0 if name.startswith("fashion_mnist") else 1, name)


def _test_set_size(config: Path) -> int:
    """The number of test images of a config's data module (built from its ``data`` section)."""
    import bnzoo.data as data_modules

    data = yaml.safe_load(config.read_text())["data"]
    datamodule = getattr(data_modules, data["class_path"].rsplit(".", 1)[-1])(**(data.get("init_args") or {}))
    datamodule.setup("test")
    return len(datamodule.test_set)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnzoo.zoo_build", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("fit", "publish", "all"))
    parser.add_argument("names", nargs="*", help="config names under configs/pretrained (default: all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "zoo", help="where the runs go")
    args = parser.parse_args(argv)
    names = args.names or [p.stem for p in sorted(CONFIG_DIR.glob("*.yaml"), key=lambda p: _zoo_order(p.stem))]
    for name in names:
        config_path(name)
    print(f"index format {INDEX_FORMAT}; building {', '.join(names)}", flush=True)
    for name in names:
        if args.stage in ("fit", "all"):
            print(f"{name}: fit ...", flush=True)
            print(f"{name}: {fit(name, args.workdir)}", flush=True)
        if args.stage in ("publish", "all"):
            entry = publish(name, args.workdir)
            print(f"{name}: test acc {entry['test']['acc']:.4f}, {entry['size_bytes']} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
