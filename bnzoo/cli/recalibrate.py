"""``bnzoo recalibrate``: recompute a trained checkpoint's norm statistics without training.

    bnzoo recalibrate --config configs/fashion_mnist/resnet.yaml --ckpt_path runs/.../last.ckpt \\
        [--num_batches 200] [--population] [--output recalibrated.ckpt] [any --model/--data override]

The model and data come from the config (as in ``bnzoo fit``), the weights from the checkpoint (loaded with
``weights_only=True``); statistics are re-estimated from training batches with
:func:`bnzoo.norms.recalibrate_norm_stats`, the validation accuracy is printed before and after, and the
checkpoint is written again (atomically) with the new statistics and everything else unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..callbacks.recalibrate import run_model
from ..io import atomic_torch_save, safe_torch_load
from ..norms.recalibration import recalibrate_norm_stats
from ..zoo.trust import check_checkpoint_hyperparameters
from .errors import TerseArgumentParser

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = TerseArgumentParser(
        prog="bnzoo recalibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for bnzoo fit")
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to recalibrate")
    parser.add_argument("--num_batches", type=_positive_int, default=100, help="training batches to estimate from")
    parser.add_argument("--population", action="store_true", help="exact population statistics (not Alg. 2)")
    parser.add_argument("--output", help="where to write (default: <checkpoint>-recalibrated.ckpt beside it)")
    return parser


def main(argv: list[str]) -> int:
    from .config import check_config_fits  # imported here: the CLI imports every model and data module
    from .lightning_cli import BnzooCLI

    args, overrides = _parser().parse_known_args(argv)
    source = Path(args.ckpt_path)
    checkpoint = safe_torch_load(source)  # a missing, unreadable or unsafe file: one error naming it
    check_checkpoint_hyperparameters(checkpoint, str(source))
    cli_args = [item for config in args.config for item in ("--config", config)]
    cli_args += [*overrides, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = BnzooCLI(args=cli_args, run=False)
    check_config_fits(checkpoint, cli.config, str(source))  # e.g. a bn checkpoint with a renorm config
    model, data = cli.model, cli.datamodule
    model.load_state_dict(checkpoint["state_dict"])
    data.prepare_data()
    data.setup("fit")
    before = model.evaluate(data.val_dataloader())
    result = recalibrate_norm_stats(
        model, data.train_dataloader(), lambda batch: run_model(model, batch), args.num_batches, args.population
    )
    after = model.evaluate(data.val_dataloader())
    checkpoint["state_dict"] = model.state_dict()
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}-recalibrated.ckpt")
    atomic_torch_save(checkpoint, output)
    estimate = "population" if args.population else "Algorithm 2"
    print(f"recalibrated {len(result.recalibrated)} norm layers from {result.batches} batches ({estimate})")
    if result.skipped:
        print(f"kept the statistics of {len(result.skipped)} norm layers that got no rows: {result.skipped_summary()}")
    print(f"val/acc: {before['acc']:.4f} -> {after['acc']:.4f}; val/loss: {before['loss']:.4f} -> {after['loss']:.4f}")
    print(f"written: {output}")
    return 0
