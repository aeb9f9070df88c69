"""The ``bnzoo`` command: a LightningCLI for ``fit | validate | test | predict``, plus bnzoo's own tools
(``recalibrate``, ``export``, ``pretrained``, ``experiment``).

    bnzoo fit --config configs/fashion_mnist/resnet.yaml --model.init_args.norm renorm
    bnzoo test --config configs/fashion_mnist/resnet.yaml --ckpt_path runs/<name>/checkpoints/last.ckpt
    bnzoo fit --config ... --print_config

Model and data classes are chosen by name (``--model ImageClassifier``, ``--data FashionMNISTDataModule``);
the data module's ``num_classes``, ``in_chans``, ``image_size``, ``input_size`` and ``max_length`` are linked to
the model. Checkpoints (the best by ``val/acc``, and ``last.ckpt`` after every validation) go to
``<save_dir>/<name>/checkpoints`` of the TensorBoard logger, the same folder for every version of a run, so
``--ckpt_path last`` resumes a stopped run from its last validation. (A fit without ``--ckpt_path`` always
starts afresh.)
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .callbacks.checkpoints import LastCheckpoint
from .checkpoint_io import AtomicCheckpointIO, safe_torch_load
from .data import IMAGE_DATAMODULES  # importing bnzoo.data makes its modules selectable by name
from .loggers import LearningRateMonitor
from .tasks import ClassificationTask, check_model_config

__all__ = ["BnzooCLI", "main"]

#: a logger ``name`` of "auto" becomes ``<dataset>-<model>-<norm>``, e.g. ``fashion_mnist-resnet20-renorm``
AUTO_NAME = "auto"

LINKED_DATA_ATTRIBUTES = ("num_classes", "in_chans", "image_size", "input_size", "max_length")

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


class BnzooCLI(LightningCLI):
    """LightningCLI with bnzoo's defaults: links, checkpoints, atomic saves, readable errors."""

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
        super().__init__(
            model_class=ClassificationTask,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand not in ("fit", "validate", "test", "predict"):
            return
        config = self.config[subcommand]
        try:
            if subcommand != "fit":  # a pretrained name or URL: its sha256-verified file
                from .hub import resolve_ckpt_path

                config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"))
            # LightningCLI would silently replace the config's model by the checkpoint's: refuse a mismatch
            check_checkpoint_matches_config(config.get("ckpt_path"), (config.get("model") or {}).get("init_args"))
        except ValueError as err:
            _exit_with_error(err)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = (config.get("model") or {}).get("init_args") or {}
        try:  # a readable message for a bad name or option, before jsonargparse wraps it while instantiating
            check_model_config(**{k: model.get(k) for k in ("model", "norm", "norm_options", "model_options")})
        except ValueError as err:
            _exit_with_error(err)
        self.run_name = run_name(config)
        logger = config.get("trainer", {}).get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and init_args.get("name") == AUTO_NAME:
            init_args["name"] = self.run_name

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # a bad model/norm/option: the message says which and why
            _exit_with_error(err)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        _place_checkpoints_in_run_folder(trainer, self.run_name)  # set by before_instantiate_classes
        return trainer

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


def check_checkpoint_matches_config(ckpt_path: str | None, model_args: Any) -> None:
    """Raise a ValueError naming both when the checkpoint at ``ckpt_path`` holds another model or norm than the
    config's ``model.init_args`` would build."""
    if not ckpt_path or model_args is None or not os.path.isfile(ckpt_path):
        return
    trained = safe_torch_load(ckpt_path).get("hyper_parameters", {})
    differ = [k for k in ("model", "norm") if k in trained and model_args.get(k) != trained[k]]
    if differ:
        raise ValueError(
            f"{ckpt_path} holds a {trained.get('model')!r} with norm {trained.get('norm')!r}, but the config builds a "
            f"{model_args.get('model')!r} with norm {model_args.get('norm')!r}; use the checkpoint's config (for the "
            "zoo: configs/pretrained/<name>.yaml) or set --model.init_args.model/norm to match"
        )


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


def _place_checkpoints_in_run_folder(trainer: L.Trainer, name: str) -> None:
    """Point checkpoint callbacks without a folder at ``<save_dir>/<name>/checkpoints`` of the logger: one folder
    for every version of the run, so ``--ckpt_path last`` finds the previous version's. Without a logger:
    ``<default_root_dir>/<name>/checkpoints`` (``runs/...`` by default), never the working directory's
    ``checkpoints/`` -- in this repository, the pretrained zoo."""
    logger = trainer.logger
    if logger is not None and logger.save_dir is not None:
        folder = os.path.join(logger.save_dir, str(logger.name or ""), "checkpoints")
    else:
        folder = os.path.join(trainer.default_root_dir, name, "checkpoints")
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = folder


def _exit_with_error(err: BaseException) -> None:
    print(f"bnzoo: error: {err}", file=sys.stderr)
    raise SystemExit(2)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnzoo`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _extra_command(argv[0])(argv[1:])
    try:
        BnzooCLI(args=None if args is None else argv)
    except FileNotFoundError as err:  # missing data or checkpoint: the message names the path and the remedy
        if os.environ.get("BNZOO_DEBUG"):
            raise
        _exit_with_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
