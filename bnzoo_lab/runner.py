"""Run an experiment: every variant x seed trained by bnzoo's own CLI in this process, then measured.

For each run the runner writes the complete ``bnzoo fit`` config it uses to
``<runs_dir>/<experiment>/<variant>/seed<k>.yaml`` (base config + variant + ``--quick`` overrides + seed, a
TensorBoard logger into the same folder, and a :class:`~bnzoo_lab.recorder.MetricsRecorder`), so any run
can be repeated by hand with ``bnzoo fit --config <that file>``. After training it measures what the spec asks
(``test``: accuracy on the test split in eval mode, i.e. with the running statistics; ``recalibrated``: the
same after :func:`bnzoo.norms.recalibrate_norm_stats` -- Alg. 2, or with the spec's ``recalibration:
{compare_population: true}`` also with the exact population moments of the same batches, as
``population_test_acc``; ``variance_shift``: running variance over the test-time
variance of every norm layer's input) and collects the histories of the diagnostics callbacks in the config.
The results of all runs go to ``<results_dir>/<experiment>.json`` with their provenance (the code's commit, the
sources' and the spec's hashes, the package versions: :mod:`bnzoo_lab.provenance`), from which
``bnzoo experiment report`` works.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from bnzoo.callbacks.activations import ActivationPercentiles
from bnzoo.callbacks.landscape import LandscapeProbe
from bnzoo.callbacks.norm_statistics import NormStatistics
from bnzoo.callbacks.recalibrate import run_model
from bnzoo.cli.lightning_cli import BnzooCLI
from bnzoo.io import atomic_write_bytes
from bnzoo.norms.introspect import normalized_rows, stat_norm_layers
from bnzoo.norms.recalibration import MomentSums, recalibrate_norm_stats

from .provenance import collect as collect_provenance
from .recorder import MetricsRecorder
from .spec import ExperimentSpec, Variant, deep_merge, load_spec

__all__ = ["build_run_config", "run_experiment", "run_one", "run_suite", "variance_shift"]

#: trainer settings of every experiment run unless its config says otherwise; ``val_check_interval`` counts
#: optimizer steps across epochs (``check_val_every_n_epoch: null``), as the experiments' step budgets do
RUN_DEFAULTS: dict[str, Any] = {
    "trainer": {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": None,
    },
    "checkpoint": {"save_top_k": 0},  # the results are the JSON file: no checkpoint files per run
    "last_checkpoint": {"every_n_epochs": 0},
}

#: Lightning warnings that every experiment run would print and that say nothing about the run
HARMLESS_WARNINGS = (
    ".*does not have many workers.*",  # num_workers=0 is bnzoo's deliberate default (in-memory batches)
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*The number of training batches.*",
    ".*Experiment logs directory.*",
    ".*Checkpoint directory.*exists and is not empty.*",
    ".*LightningCLI's args parameter.*",  # the runner passes args on purpose, inside `bnzoo experiment run`
)

#: the diagnostics callbacks whose ``history`` a run keeps, under these keys of its record
HISTORIES: dict[str, type] = {
    "percentiles": ActivationPercentiles,
    "landscape": LandscapeProbe,
    "norm_statistics": NormStatistics,
}


def build_run_config(spec: ExperimentSpec, variant: Variant, seed: int, quick: bool, runs_dir: Path) -> dict[str, Any]:
    """The full ``bnzoo fit`` config of one run (see the module docstring)."""
    config = deep_merge(RUN_DEFAULTS, spec.base_config())
    config = deep_merge(config, variant.config)
    if quick:
        config = deep_merge(config, spec.quick)
    config["seed_everything"] = seed
    config.setdefault("data", {}).setdefault("init_args", {})["seed"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(runs_dir / spec.name), "name": variant.name, "version": f"seed{seed}",
                      "log_graph": False, "default_hp_metric": False},
    }  # fmt: skip
    callbacks = list(trainer.get("callbacks") or [])
    trainer["callbacks"] = [*callbacks, {"class_path": "bnzoo_lab.recorder.MetricsRecorder"}]
    return config


@torch.no_grad()
def variance_shift(model: nn.Module, loader: Any, forward: Any, max_batches: int | None = None) -> dict[str, float]:
    """``running_var / Var[x]`` of every norm layer, ``Var[x]`` its input's variance over ``loader`` in eval mode.

    Li et al. 2019 ("Understanding the Disharmony between Dropout and Batch Normalization by Variance Shift"):
    dropout before BN makes the variance BN learned in training (dropout on) differ from the one it meets at
    inference (dropout off); a ratio above 1 means the running variance overestimates it. Returns the mean ratio
    over channels per layer and ``"mean"`` over layers.
    """
    layers = stat_norm_layers(model)
    accumulators = {layer: MomentSums(layer) for layer in layers}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: accumulators[m].add(normalized_rows(m, args, kwargs)), with_kwargs=True
        )
        for layer in layers
    ]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            forward(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    names = {m: n for n, m in model.named_modules()}
    ratios = {}
    for layer, accumulator in accumulators.items():
        _, var = MomentSums.estimate(accumulator.sums, population=True)
        ratios[names[layer].removeprefix("model.")] = float((layer.running_var.double() / var.clamp_min(1e-12)).mean())
    if ratios:
        ratios["mean"] = sum(ratios.values()) / len(ratios)
    return ratios


def _measure(spec: ExperimentSpec, cli: BnzooCLI, quick: bool) -> dict[str, Any]:
    task, data = cli.model, cli.datamodule
    data.setup("test")
    limit = 1 if quick else spec.test_batches
    forward = functools.partial(run_model, task)
    results: dict[str, Any] = {}
    if "test" in spec.measure or "recalibrated" in spec.measure:
        results |= {f"test_{k}": v for k, v in task.evaluate(data.test_dataloader(), limit).items()}
    if "variance_shift" in spec.measure:
        results["variance_shift"] = variance_shift(task, data.test_dataloader(), forward, limit)
    if "recalibrated" in spec.measure:
        loader = data.train_dataloader()
        batches = list(itertools.islice(loader, recalibration_batches(spec.recalibration, loader)))
        used = recalibrate_norm_stats(task, batches, forward, len(batches),
                                      bool(spec.recalibration.get("population", False))).batches  # fmt: skip
        results |= {f"recalibrated_test_{k}": v for k, v in task.evaluate(data.test_dataloader(), limit).items()}
        results["recalibration_batches"] = used
        if spec.recalibration.get("compare_population", False):  # the same batches, exact population moments
            recalibrate_norm_stats(task, batches, forward, len(batches), population=True)
            results |= {f"population_test_{k}": v for k, v in task.evaluate(data.test_dataloader(), limit).items()}
    return results


def recalibration_batches(recalibration: dict[str, Any], loader: Any) -> int:
    """How many training batches recalibration uses: ``num_samples`` (divided by the loader's batch size, so
    that runs with different batch sizes see as many samples) or ``num_batches`` (default 100), at most the
    loader's length."""
    unknown = sorted(set(recalibration) - {"num_batches", "num_samples", "population", "compare_population"})
    if unknown:
        raise ValueError(f"recalibration has unknown key(s) {', '.join(unknown)}; valid: num_batches, num_samples, "
                         "population, compare_population")  # fmt: skip
    if "num_samples" in recalibration:
        wanted = -(-int(recalibration["num_samples"]) // int(loader.batch_sampler.batch_size))
    else:
        wanted = int(recalibration.get("num_batches", 100))
    return max(1, min(wanted, len(loader)))


@contextlib.contextmanager
def _quiet(log_file: Path):
    """Lightning's info messages and the CLI's prints go to the run's log file; known harmless warnings off."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    handler = logging.FileHandler(log_file)
    for lg in loggers:
        lg.setLevel(logging.WARNING)
        lg.addHandler(handler)
    try:
        with open(log_file, "a") as out, contextlib.redirect_stdout(out), warnings.catch_warnings():
            for message in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
            lg.removeHandler(handler)
        handler.close()


def run_one(spec: ExperimentSpec, variant: Variant, seed: int, quick: bool, runs_dir: Path) -> dict[str, Any]:
    """Train and measure one variant with one seed; returns its record for the results file."""
    folder = runs_dir / spec.name / variant.name
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"seed{seed}.yaml"
    config_path.write_text(yaml.safe_dump(build_run_config(spec, variant, seed, quick, runs_dir), sort_keys=False))
    start = time.perf_counter()
    with _quiet(folder / f"seed{seed}.log"):
        cli = BnzooCLI(args=["fit", "--config", str(config_path)])
        record: dict[str, Any] = {"variant": variant.name, "seed": seed, "config": str(config_path)}
        record["steps"] = cli.trainer.global_step
        record["num_classes"] = int(cli.model.hparams.get("num_classes", 10))
        for callback in cli.trainer.callbacks:
            if isinstance(callback, MetricsRecorder):
                record |= callback.as_dict()
            for key, kind in HISTORIES.items():
                if isinstance(callback, kind):
                    record[key] = callback.history
        record |= _measure(spec, cli, quick)
    record["wall_s"] = time.perf_counter() - start
    del cli
    gc.collect()
    return record


def machine() -> dict[str, Any]:
    """The machine and the load on it, for the results file."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg": list(os.getloadavg()),
    }


def run_experiment(
    spec: ExperimentSpec | str,
    *,
    quick: bool = False,
    seeds: list[int] | None = None,
    runs_dir: Path = Path("runs/experiments"),
    results_dir: Path = Path("reports/results"),
    log: Any = print,
) -> Path:
    """Run every variant x seed of ``spec`` (a spec or a name) and write ``<results_dir>/<name>.json``."""
    spec = load_spec(spec) if isinstance(spec, str) else spec
    seeds = list(seeds if seeds is not None else (spec.quick_seeds if quick else spec.seeds))
    results_dir.mkdir(parents=True, exist_ok=True)
    started, start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    before, provenance = machine(), collect_provenance(spec)  # the code and spec as the runs start
    runs = []
    for variant in spec.variants.values():
        for seed in seeds:
            record = run_one(spec, variant, seed, quick, runs_dir)
            runs.append(record)
            acc = record.get("test_acc")
            log(f"{spec.name}: {variant.name} seed {seed}: {record['steps']} steps, "
                f"test acc {acc if acc is None else round(acc, 4)}, {record['wall_s']:.1f} s")  # fmt: skip
    results = {
        "experiment": spec.name,
        "spec": spec.summary(),
        "quick": quick,
        "seeds": seeds,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        "machine": before,
        "provenance": provenance,
        "load_avg_after": list(os.getloadavg()),
        "runs": runs,
    }
    path = results_dir / f"{spec.name}.json"
    atomic_write_bytes(path, json.dumps(results, indent=1).encode())  # the product of the whole run
    log(f"{spec.name}: {len(runs)} runs in {results['wall_s']:.0f} s -> {path}")
    return path


def run_suite(
    names: list[str],
    *,
    jobs: int = 1,
    threads: int | None = None,
    quick: bool = False,
    seeds: list[int] | None = None,
    runs_dir: Path = Path("runs/experiments"),
    results_dir: Path = Path("reports/results"),
    log: Any = print,
) -> dict[str, Any]:
    """Run several experiments, ``jobs`` at a time (each in its own process with ``threads`` threads), longest
    expected first; writes ``<results_dir>/suite.json`` with the wall time and the machine's load average,
    sampled every 10 s while the suite runs."""
    specs = sorted((load_spec(n) for n in names), key=lambda s: -s.expected_minutes)
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    results_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(specs), {}, []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    last_sample = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            command = [sys.executable, "-m", "bnzoo_lab", "run", spec.name, "--runs-dir", str(runs_dir),
                       "--results-dir", str(results_dir)]  # fmt: skip
            command += ["--quick"] if quick else []
            command += ["--seeds", *map(str, seeds)] if seeds else []
            command += ["--threads", str(threads)] if threads is not None else []
            log_file = open(runs_dir / f"{spec.name}.log", "w")  # noqa: SIM115 - closed when the process ends
            running[spec.name] = (subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                                  log_file, time.perf_counter())  # fmt: skip
            log(f"started {spec.name} (expected ~{spec.expected_minutes:g} min)")
        time.sleep(0.5)
        if time.perf_counter() - last_sample >= 10:
            loads.append(os.getloadavg()[0])
            last_sample = time.perf_counter()
        for name, (process, log_file, began) in list(running.items()):
            if process.poll() is not None:
                log_file.close()
                del running[name]
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                if process.returncode != 0:
                    failed.append(name)
                log(f"{name}: {status} in {time.perf_counter() - began:.0f} s (log: {runs_dir / f'{name}.log'})")
    suite = {
        "experiments": [s.name for s in specs],
        "failed": failed,
        "quick": quick,
        "jobs": jobs,
        "threads": threads,
        "wall_s": time.perf_counter() - start,
        "load_avg_1min": {"mean": sum(loads) / len(loads), "max": max(loads), "samples": len(loads)},
        "machine": machine(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(results_dir / "suite.json", json.dumps(suite, indent=1).encode())
    mean_load = suite["load_avg_1min"]["mean"]
    log(f"suite: {len(specs)} experiments in {suite['wall_s'] / 60:.1f} min, mean load {mean_load:.2f}")
    return suite
