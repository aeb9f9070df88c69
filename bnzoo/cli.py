"""The ``bnzoo`` command: a LightningCLI for ``fit | validate | test | predict``, plus bnzoo's own tools
(``recalibrate``, ``export``, ``pretrained``, ``experiment``).

    bnzoo fit --config configs/fashion_mnist/resnet.yaml --model.init_args.norm renorm
    bnzoo fit --config configs/fashion_mnist/resnet.yaml --ckpt_path last        # resume that run
    bnzoo test --config configs/fashion_mnist/resnet.yaml --ckpt_path last       # test its last checkpoint
    bnzoo fit --config ... --print_config

Model and data classes are chosen by name (``--model ImageClassifier``, ``--data FashionMNISTDataModule``);
the data module's ``num_classes``, ``in_chans``, ``image_size``, ``input_size`` and ``max_length`` are linked to
the model.

**Run folders** (:mod:`bnzoo.runs`): each fresh run claims its own ``<save_dir>/<name>/version_<N>/`` (atomically,
so concurrent runs and configs sharing a name never share one) for its TensorBoard logs and its
``checkpoints/`` (the best by ``val/acc``, and ``last.ckpt`` after every validation). ``--ckpt_path last``
resumes the latest version of the run name whose ``last.ckpt`` fits the config (:mod:`bnzoo.compatibility`) and
continues in its folder; ``--ckpt_path best`` (validate/test/predict) takes that run's best checkpoint. Nothing to
resume, or only runs of another network, is an error, never a silent fresh start.

**Checkpoints** given with ``--ckpt_path`` (a file, a zoo name, an ``http(s)``/``file`` URL) are resolved by
:func:`bnzoo.hub.resolve_ckpt_path` -- the same verified download for every subcommand, ``fit`` included --,
loaded with :func:`bnzoo.checkpoint_io.safe_torch_load`, their hyperparameters checked by
:func:`bnzoo.checkpoint_trust.check_stored_hyperparameters` (before LightningCLI imports the class they name) and
compared with the config; Lightning's own loads go through :class:`bnzoo.checkpoint_io.AtomicCheckpointIO`.

**Errors** (:mod:`bnzoo.errors`): a bad option, value or file ends the command with exit status 2 and at most three
lines on stderr naming it; ``BNZOO_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .callbacks.checkpoints import BestCheckpoint, LastCheckpoint
from .checkpoint_io import AtomicCheckpointIO, safe_torch_load, sweep_temporaries
from .checkpoint_trust import check_checkpoint_hyperparameters
from .compatibility import check_fits, data_differences, describe, network_options, task_differences
from .data import IMAGE_DATAMODULES  # importing bnzoo.data makes its modules selectable by name
from .errors import UsageError, release_held_output, run_command
from .loggers import LearningRateMonitor
from .runs import CHECKPOINTS, RunLock, claim_version, find_resumable, is_launch_rank_zero, run_version_of
from .tasks import ClassificationTask, check_task_hparams

__all__ = ["BnzooCLI", "check_trainer_config", "config_differences", "main"]

#: a logger ``name`` of "auto" becomes ``<dataset>-<model>-<norm>``, e.g. ``fashion_mnist-resnet20-renorm``
AUTO_NAME = "auto"

LINKED_DATA_ATTRIBUTES = ("num_classes", "in_chans", "image_size", "input_size", "max_length")

#: LightningCLI's subcommands (each may take --ckpt_path)
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: bnzoo's own subcommands beside LightningCLI's: ``name -> "module:function"``, imported when used. Each function
#: takes the remaining command-line arguments and returns an exit code.
EXTRA_COMMANDS: dict[str, str] = {
    "recalibrate": "bnzoo.recalibrate_command:main",
    "export": "bnzoo.hub:export_main",
    "pretrained": "bnzoo.hub:pretrained_main",
    "experiment": "bnzoo.experiments:main",
}


def _extra_command(name: str) -> Callable[[list[str]], int]:
    module_name, function = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), function)


class BnzooArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are a :class:`~bnzoo.errors.UsageError` (one line, see
    :mod:`bnzoo.errors`) instead of the usage dump and the error; ``--help`` prints the usage."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # an inner parse that jsonargparse itself recovers from
            return super().error(message, ex)
        unknown = re.search(r"does not accept options? '([^']+)'|unrecognized arguments: --([^\s=]+)", message)
        if unknown:  # a misspelled key: name the closest valid ones
            parser = getattr(ex, "subcommand_parser", None) or self
            keys = [a.dest for a in parser._actions if isinstance(a.dest, str)]
            close = difflib.get_close_matches(unknown.group(1) or unknown.group(2), keys, n=3, cutoff=0.6)
            message += f"; closest: {', '.join(close)}" if close else " (see --help)"
        raise UsageError(message) from ex

    def parse_args(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        check_config_files(sys.argv[1:] if args is None else args)
        return super().parse_args(args, *more, **kwargs)


class _ReleaseHeldOutput(Callback):
    """Writes out the setup output :func:`bnzoo.errors.run_command` held back, once the run reaches its first
    batch (setup has then succeeded)."""

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        release_held_output()

    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = on_train_batch_start


class BnzooCLI(LightningCLI):
    """LightningCLI with bnzoo's defaults: links, checkpoints, run folders, safe loading, readable errors."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        trainer_defaults = {
            "logger": {
                "class_path": "bnzoo.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": AUTO_NAME, "log_graph": True, "default_hp_metric": False},
            },
            "callbacks": [LearningRateMonitor(logging_interval="step")],  # persistent: in every run
            "default_root_dir": "runs",  # without a logger too, nothing lands in the working directory
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        self.run_name = ""
        self.run_root: Path | None = None
        self.run_dir: Path | None = None
        self.resume_version: int | None = None
        self._run_lock: RunLock | None = None
        try:
            with warnings.catch_warnings():
                # bnzoo passes args from within Python on purpose (recalibrate, the claims lab, tests): LightningCLI's
                # warning about args beside sys.argv is not for it
                warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
                super().__init__(
                    model_class=ClassificationTask,
                    datamodule_class=L.LightningDataModule,
                    subclass_mode_model=True,
                    subclass_mode_data=True,
                    trainer_defaults=trainer_defaults,
                    save_config_kwargs={"overwrite": True},
                    parser_class=BnzooArgumentParser,
                    args=args,
                    run=run,
                    **kwargs,
                )
        finally:  # the subcommand has run (or failed): the run folder is free again
            if self._run_lock is not None:
                self._run_lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")

    # -- parsing: the run, its checkpoint ---------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand not in LIGHTNING_SUBCOMMANDS:
            return
        config = self.config[subcommand]
        self.run_name = run_name(config)
        self.run_root = _run_root(config, self.run_name)
        config["ckpt_path"] = self._resolve_ckpt_path(subcommand, config)
        ckpt_path = config["ckpt_path"]
        if ckpt_path and Path(ckpt_path).is_file():
            # checked before LightningCLI's _parse_ckpt_path imports the class the file names and replaces the
            # config's model by the file's hyperparameters
            checkpoint = safe_torch_load(ckpt_path)
            check_checkpoint_hyperparameters(checkpoint, str(ckpt_path))
            check_config_fits(checkpoint, config, str(ckpt_path))
            if subcommand == "fit":
                self.resume_version = run_version_of(ckpt_path, self.run_root)

    def _resolve_ckpt_path(self, subcommand: str, config: Any) -> str | None:
        """``--ckpt_path`` as a local file: ``last``/``best`` of this run, or what
        :func:`bnzoo.hub.resolve_ckpt_path` makes of a name, URL or path."""
        from .hub import resolve_ckpt_path

        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in ("last", "best"):
            return resolve_ckpt_path(ckpt_path)
        if ckpt_path == "best" and subcommand == "fit":
            raise ValueError("--ckpt_path best: fit resumes from last (or from a checkpoint file), not from best")
        assert self.run_root is not None
        version = _explicit_version(config)
        _, last = find_resumable(self.run_root, lambda path: config_differences(safe_torch_load(path), config),
                                 version)  # fmt: skip
        return str(last) if ckpt_path == "last" else _best_of(last)

    # -- before building: values, the run folder --------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_task_hparams(_model_hparams(config))
        check_trainer_config(config.get("trainer") or {})
        self.run_name = run_name(config)
        _run_root(config, self.run_name)  # names the logger's run
        if self.subcommand in LIGHTNING_SUBCOMMANDS:
            self.run_dir = self._prepare_run_folder(config)

    def _prepare_run_folder(self, config: Any) -> Path | None:
        """The run's ``version_<N>`` folder (on global rank 0; None elsewhere, and for a validate/test/predict
        without a logger, which writes nothing): the resumed run's, or a freshly claimed one. ``fit`` locks it
        and sweeps the temporaries a killed run left in its checkpoints."""
        fit = self.subcommand == "fit"
        logger_args = _run_logger_args(config)
        if (not fit and logger_args is None) or not is_launch_rank_zero():
            return None
        assert self.run_root is not None
        explicit = _explicit_version(config)
        if explicit is not None:
            folder = self.run_root / explicit
            folder.mkdir(parents=True, exist_ok=True)
            if fit and self.resume_version is None and any((folder / CHECKPOINTS).glob("*.ckpt")):
                raise ValueError(
                    f"{folder / CHECKPOINTS} holds checkpoints of an earlier run: resume it with --ckpt_path last, or "
                    "choose another --trainer.logger.init_args.version (or none: a fresh version is claimed)"
                )
        else:
            number = self.resume_version if self.resume_version is not None else claim_version(self.run_root)
            folder = self.run_root / f"version_{number}"
            if logger_args is not None:
                logger_args["version"] = number
        if fit:
            self._run_lock = RunLock(folder)
            sweep_temporaries(folder / CHECKPOINTS)
        return folder

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        _use_safe_checkpoint_io(trainer)
        _place_checkpoints(trainer, self.run_dir, self.run_name)  # set by before_instantiate_classes
        trainer.callbacks.append(_ReleaseHeldOutput())
        return trainer

    # -- after the run ----------------------------------------------------------------------------------------
    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.global_rank != 0:
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        last = next((c.best_model_path for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), "")
        print(f"\nbest checkpoint: {best or '(none)'}\nlast checkpoint: {last or '(none)'}")
        if trainer.logger is not None and trainer.logger.save_dir:
            print(f"TensorBoard: tensorboard --logdir {trainer.logger.save_dir}")

    def after_test(self) -> None:
        if self.trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        for name, value in sorted(metrics.items()):
            print(f"{name}: {value:.4f}")


# -- the config and a checkpoint ------------------------------------------------------------------------------
def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return dict(value.as_dict() if hasattr(value, "as_dict") else value)


def check_config_files(argv: Sequence[str]) -> None:
    """Raise a :class:`~bnzoo.errors.UsageError` naming a ``--config`` file that is no YAML mapping (jsonargparse's
    own message says what is wrong, not in which file)."""
    argv = list(argv)
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in filter(os.path.isfile, paths):
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"--config {path}: not valid YAML ({problem}{where})") from err
        if content is not None and not isinstance(content, dict):
            raise UsageError(
                f"--config {path}: a config is a mapping of sections (trainer:, model:, data:, ...), "
                f"not a {type(content).__name__}"
            )


def _model_hparams(config: Any) -> dict[str, Any]:
    """The task hyperparameters a config builds: ``model.init_args`` and ``dict_kwargs`` (where LightningCLI puts
    a checkpoint's), with ``_class_path``; without the arguments linked from the data module (their values in the
    parsed config are placeholders: the data module's class decides them)."""
    model = config.get("model") or {}
    hparams = {**_as_dict(model.get("init_args")), **_as_dict(model.get("dict_kwargs"))}
    for name in LINKED_DATA_ATTRIBUTES:
        if name not in _as_dict(model.get("dict_kwargs")):
            hparams.pop(name, None)
    if model.get("class_path"):
        hparams["_class_path"] = model.get("class_path")
    return hparams


def _data_hparams(config: Any) -> dict[str, Any]:
    data = config.get("data") or {}
    return {"_class_path": data.get("class_path"), **_as_dict(data.get("init_args"))}


def config_differences(checkpoint: Mapping[str, Any], config: Any) -> list[str]:
    """How a loaded Lightning checkpoint differs from what a parsed config builds (:mod:`bnzoo.compatibility`:
    the task, its network, its data)."""
    return task_differences(checkpoint.get("hyper_parameters") or {}, _model_hparams(config)) + data_differences(
        checkpoint.get("datamodule_hyper_parameters") or {}, _data_hparams(config)
    )


def check_config_fits(checkpoint: Mapping[str, Any], config: Any, where: str) -> None:
    """Raise an :class:`~bnzoo.compatibility.IncompatibleCheckpointError` naming both when the checkpoint at
    ``where`` holds another task, network or data than ``config`` builds."""
    stored, wanted = checkpoint.get("hyper_parameters") or {}, _model_hparams(config)
    check_fits(
        config_differences(checkpoint, config), where,
        describe(stored.get("model"), network_options(stored)),
        f"what the config builds, {describe(wanted.get('model'), network_options(wanted))}",
        "Use the checkpoint's config (for the zoo: configs/pretrained/<name>.yaml) or set --model.init_args.* to match",
    )  # fmt: skip


def _best_of(last: Path) -> str:
    """The best checkpoint a run recorded in its ``last.ckpt`` (the top-k callback's ``best_model_path``)."""
    states = (safe_torch_load(last).get("callbacks") or {}).values()
    best = next((s.get("best_model_path") for s in states if isinstance(s, dict) and s.get("monitor")), None)
    if not best or not Path(best).is_file():
        raise FileNotFoundError(f"--ckpt_path best: the run of {last} has no best checkpoint file ({best or 'none'})")
    return str(best)


def run_name(config: Any) -> str:
    """``<dataset>-<model>-<norm>`` from a parsed config, e.g. ``fashion_mnist-resnet20-renorm``; sequence tasks
    add their mode, e.g. ``fashion_mnist_row-ds2_gru-bn``."""
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
    return f"{dataset}-{model.get('model', 'model')}-{model.get('norm', 'norm')}"


def _run_logger_args(config: Any) -> Any:
    """The ``init_args`` of the config's (first) logger when it lays out runs as ``<save_dir>/<name>/<version>``
    (TensorBoard, CSV), else None."""
    logger = (config.get("trainer") or {}).get("logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    init_args = getattr(first, "init_args", None)
    if init_args is not None and "save_dir" in init_args and "version" in init_args and "name" in init_args:
        return init_args
    return None


def _run_root(config: Any, name: str) -> Path:
    """``<save_dir>/<logger name>`` (an ``auto`` logger name becomes ``name``), or ``<default_root_dir>/<name>``
    without such a logger: the folder of the run's versions."""
    logger_args = _run_logger_args(config)
    trainer = config.get("trainer") or {}
    if logger_args is None:
        return Path(trainer.get("default_root_dir") or "runs") / name
    if logger_args.get("name") == AUTO_NAME:
        logger_args["name"] = name
    return Path(logger_args.get("save_dir") or trainer.get("default_root_dir") or ".") / str(logger_args["name"] or "")


def _explicit_version(config: Any) -> str | None:
    """The folder name of a version the logger config fixes (``version: 3`` -> ``version_3``, ``seed0``), or None."""
    logger_args = _run_logger_args(config)
    version = None if logger_args is None else logger_args.get("version")
    if version is None:
        return None
    return version if isinstance(version, str) else f"version_{version}"


# -- the trainer ----------------------------------------------------------------------------------------------
_GPU_ACCELERATORS = ("gpu", "cuda", "mps")


def _available_accelerators() -> list[str]:
    available = ["cpu", "auto"]
    if torch.cuda.is_available():
        available += ["gpu", "cuda"]
    if torch.backends.mps.is_available():
        available += ["gpu", "mps"]
    return list(dict.fromkeys(available))


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the option and what is valid for trainer settings Lightning would accept
    silently (``max_epochs=0``) or refuse with a traceback or an unhelpful message (``max_epochs=-5``,
    ``devices=0``, ``accelerator=gpu`` without a GPU)."""
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) and (value == -1 or value >= 1)):
            raise ValueError(f"--trainer.{key} {value!r}: must be an int >= 1, or -1 for no limit (0 trains nothing)")
    devices = trainer.get("devices")
    valid_devices = (
        devices in ("auto", -1, "-1")
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
        or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit() and devices.strip() != "0")
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    )
    if devices is not None and not valid_devices:
        raise ValueError(f"--trainer.devices {devices!r}: valid: auto, -1 (all), a count >= 1, or a list of indices")
    accelerator = trainer.get("accelerator")
    available = _available_accelerators()
    if isinstance(accelerator, str) and accelerator in _GPU_ACCELERATORS and accelerator not in available:
        raise ValueError(
            f"--trainer.accelerator {accelerator}: no {accelerator.upper()} device on this machine (a GPU preset such "
            f"as configs/trainer/gpu.yaml needs one); valid here: {', '.join(available)}"
        )


def _use_safe_checkpoint_io(trainer: L.Trainer) -> None:
    """Every checkpoint Lightning loads goes through :class:`AtomicCheckpointIO` (``weights_only=True``); a
    checkpoint plugin that would load otherwise is refused by name."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if type(checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    elif not isinstance(checkpoint_io, AtomicCheckpointIO):
        raise ValueError(
            f"--trainer.plugins: checkpoint_io {type(checkpoint_io).__name__} is not supported: bnzoo loads every "
            "checkpoint through its own AtomicCheckpointIO (weights_only=True)"
        )


def _place_checkpoints(trainer: L.Trainer, run_dir: Path | None, name: str) -> None:
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


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnzoo`` console script: every subcommand runs under
    :func:`bnzoo.errors.run_command` (one-line errors, ``BNZOO_DEBUG=1`` for tracebacks)."""
    argv = list(sys.argv[1:] if args is None else args)
    known = (*LIGHTNING_SUBCOMMANDS, *EXTRA_COMMANDS)
    prog = f"bnzoo {argv[0]}" if argv and argv[0] in known else "bnzoo"

    def command() -> int:
        if argv and argv[0] in EXTRA_COMMANDS:
            return _extra_command(argv[0])(argv[1:])
        BnzooCLI(args=None if args is None else argv)
        return 0

    return run_command(prog, command)


if __name__ == "__main__":
    sys.exit(main())
