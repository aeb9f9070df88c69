"""LightningCLI for ``bnzoo fit | validate | test | predict``; the other subcommands (``recalibrate``, ``export``,
``pretrained``, ``experiment``) are in :mod:`bnzoo.cli.main`'s table.

    bnzoo fit --config configs/fashion_mnist/resnet.yaml --config configs/trainer/renorm_schedule.yaml \\
        --model.init_args.norm renorm --model.init_args.norm_options '{momentum: 0.1}'
    bnzoo fit --config configs/fashion_mnist/resnet.yaml --ckpt_path last        # resume that run
    bnzoo test --config configs/fashion_mnist/resnet.yaml --ckpt_path last       # test its last checkpoint
    bnzoo predict --config configs/pretrained/fashion_mnist-resnet20-bn.yaml --ckpt_path fashion_mnist-resnet20-bn \\
        --data.path my_images/                                                  # -> <run folder>/predictions.csv
    bnzoo fit --config ... --print_config

Model and data classes are chosen by name (``--model ImageClassifier``, ``--data FashionMNISTDataModule``);
the data module's ``num_classes``, ``in_chans``, ``image_size``, ``input_size`` and ``max_length`` are linked to
the model.

**Run folders** (:mod:`bnzoo.cli.runs`): each fresh run claims its own ``<save_dir>/<name>/version_<N>/`` (atomically,
so concurrent runs and configs sharing a name never share one) for its TensorBoard logs and its
``checkpoints/`` (the best by ``val/acc``, and ``last.ckpt`` after every validation). ``--ckpt_path last``
resumes the latest version of the run name whose ``last.ckpt`` fits the config (:mod:`bnzoo.zoo.compatibility`) and
continues in its folder; ``--ckpt_path best`` (validate/test/predict) takes that run's best checkpoint. Nothing to
resume, or only runs of another network, is an error, never a silent fresh start.

**Checkpoints** given with ``--ckpt_path`` (a file, a zoo name, an ``http(s)``/``file`` URL) are resolved by
:func:`bnzoo.zoo.resolve_ckpt_path` -- the same verified download for every subcommand, ``fit`` included --,
loaded with :func:`bnzoo.io.safe_torch_load`, their hyperparameters checked by
:func:`bnzoo.zoo.trust.check_stored_hyperparameters` (before LightningCLI imports the class they name) and
compared with the config; Lightning's own loads go through :class:`bnzoo.checkpoint_io.AtomicCheckpointIO`.

**Predictions** (``predict``) are written by :class:`bnzoo.callbacks.PredictionWriter` into the run's folder (added
unless the config has a prediction writer of its own); ``--data.path`` (image data modules) predicts the user's
image files instead of the test split.

**Hyperparameters** logged (TensorBoard's hparams, ``hparams.yaml``) are the run's, flat: :mod:`bnzoo.cli.hparams`.

**Errors** (:mod:`bnzoo.cli.errors`): a bad option, value or file ends the command with exit status 2 and at most three
lines on stderr naming it; ``BNZOO_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..callbacks.checkpoints import BestCheckpoint, LastCheckpoint
from ..callbacks.predictions import PredictionWriter
from ..checkpoint_io import AtomicCheckpointIO
from ..io import safe_torch_load, sweep_temporaries
from ..tasks.classification import ClassificationTask
from ..tasks.hparams import check_task_hparams
from ..zoo.checkpoint import resolve_ckpt_path
from ..zoo.trust import check_checkpoint_hyperparameters
from .config import (
    LINKED_DATA_ATTRIBUTES,
    check_config_files,
    check_config_fits,
    check_trainer_config,
    config_differences,
    model_hparams,
)
from .errors import UsageError, release_held_output
from .hparams import check_optimizer_config, run_hparams
from .main import LIGHTNING_SUBCOMMANDS
from .runs import (
    AUTO_NAME,
    CHECKPOINTS,
    RunLock,
    best_of,
    claim_version,
    explicit_version,
    find_resumable,
    is_launch_rank_zero,
    place_checkpoints,
    run_logger_args,
    run_name,
    run_root,
    run_version_of,
)

__all__ = ["BnzooCLI", "check_trainer_config", "config_differences"]


class BnzooArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are a :class:`~bnzoo.cli.errors.UsageError` (one line, see
    :mod:`bnzoo.cli.errors`) instead of the usage dump and the error; ``--help`` prints the usage."""

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
    """Writes out the setup output :func:`bnzoo.cli.errors.run_command` held back, once the run reaches its first
    batch (setup has then succeeded)."""

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        release_held_output()

    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = on_train_batch_start


class BnzooCLI(LightningCLI):
    """LightningCLI with bnzoo's defaults: links, checkpoints, run folders, safe loading, readable errors."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        trainer_defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": AUTO_NAME, "log_graph": True, "default_hp_metric": False},
            },
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
        self.run_root = run_root(config, self.run_name)
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
        :func:`bnzoo.zoo.resolve_ckpt_path` makes of a name, URL or path."""
        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in ("last", "best"):
            return resolve_ckpt_path(ckpt_path)
        if ckpt_path == "best" and subcommand == "fit":
            raise ValueError("--ckpt_path best: fit resumes from last (or from a checkpoint file), not from best")
        assert self.run_root is not None
        version = explicit_version(config)
        _, last = find_resumable(self.run_root, lambda path: config_differences(safe_torch_load(path), config),
                                 version)  # fmt: skip
        return str(last) if ckpt_path == "last" else best_of(last)

    # -- before building: values, the run folder --------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_task_hparams(model_hparams(config))
        check_trainer_config(config.get("trainer") or {})
        check_optimizer_config(config)
        self.run_name = run_name(config)
        run_root(config, self.run_name)  # names the logger's run
        if self.subcommand in LIGHTNING_SUBCOMMANDS:
            self.run_dir = self._prepare_run_folder(config)

    def _prepare_run_folder(self, config: Any) -> Path | None:
        """The run's ``version_<N>`` folder (on global rank 0; None elsewhere, and for a validate/test/predict
        without a logger, which writes nothing): the resumed run's, or a freshly claimed one. ``fit`` locks it
        and sweeps the temporaries a killed run left in its checkpoints."""
        fit = self.subcommand == "fit"
        logger_args = run_logger_args(config)
        if (not fit and logger_args is None) or not is_launch_rank_zero():
            return None
        assert self.run_root is not None
        explicit = explicit_version(config)
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

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if isinstance(self.model, ClassificationTask):  # what the loggers get: the run, flat (bnzoo.cli.hparams)
            config = self.config[self.subcommand] if self.subcommand else self.config
            self.model.run_hparams = run_hparams(config, self.model.hparams)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        _use_safe_checkpoint_io(trainer)
        place_checkpoints(trainer, self.run_dir, self.run_name)  # set by before_instantiate_classes
        if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))  # where there is a logger
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            folder = self.run_dir or self.run_root  # without a logger: the run name's folder
            trainer.callbacks.append(PredictionWriter(str(folder) if folder is not None else None))
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


def lightning_main(argv: list[str] | None) -> int:
    """``bnzoo fit|validate|test|predict ...``: ``argv`` with the subcommand (None: ``sys.argv``)."""
    BnzooCLI(args=argv)
    return 0
