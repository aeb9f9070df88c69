"""``bnzoo recalibrate``: recompute a trained checkpoint's norm statistics without training.

    bnzoo recalibrate --config configs/fashion_mnist/resnet.yaml --ckpt_path runs/.../last.ckpt \\
        [--num_batches 200] [--population] [--output recalibrated.ckpt] [any --model/--data override]

The model and data come from the config (as in ``bnzoo fit``), the weights from the checkpoint (loaded with
``weights_only=True``); statistics are re-estimated from training batches with
:func:`bnzoo.callbacks.recalibrate_norm_stats`, the validation accuracy is printed before and after, and the
checkpoint is written again (atomically) with the new statistics and everything else unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .callbacks.recalibrate import recalibrate_norm_stats, run_model
from .checkpoint_io import atomic_torch_save, safe_torch_load

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnzoo recalibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for bnzoo fit")
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to recalibrate")
    parser.add_argument("--num_batches", type=int, default=100, help="training batches to estimate from")
    parser.add_argument("--population", action="store_true", help="exact population statistics (not Alg. 2)")
    parser.add_argument("--output", help="where to write (default: <checkpoint>-recalibrated.ckpt beside it)")
    return parser


def main(argv: list[str]) -> int:
    from .cli import BnzooCLI  # imported here: the CLI imports every model and data module

    args, overrides = _parser().parse_known_args(argv)
    source = Path(args.ckpt_path)
    if not source.is_file():
        print(f"bnzoo recalibrate: error: no checkpoint at {source}", file=sys.stderr)
        return 2
    cli_args = [item for config in args.config for item in ("--config", config)]
    cli_args += [*overrides, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = BnzooCLI(args=cli_args, run=False)
    model, data = cli.model, cli.datamodule
    checkpoint = safe_torch_load(source)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        trained = checkpoint.get("hyper_parameters", {})
        print(
            f"bnzoo recalibrate: error: {source} holds a {trained.get('model')!r} with norm {trained.get('norm')!r}, "
            f"the config builds {model.hparams.get('model')!r} with norm {model.hparams.get('norm')!r}:\n{err}",
            file=sys.stderr,
        )
        return 2
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

