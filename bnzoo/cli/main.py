"""The ``bnzoo`` command: one table of subcommands, ``--help`` listing them all, ``--version``, and one error
handler (:func:`bnzoo.cli.errors.run_command`: a bad input is at most three lines on stderr naming it, exit status
2; ``BNZOO_DEBUG=1`` shows the traceback).

    bnzoo fit --config configs/main.yaml          # Batch Renorm ResNet-20 on Fashion-MNIST
    bnzoo recalibrate RUN_OR_CHECKPOINT --config ...
    bnzoo pretrained list | info NAME | verify
    bnzoo experiment list | run NAME | report
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["LIGHTNING_SUBCOMMANDS", "SUBCOMMANDS", "main"]

#: LightningCLI's subcommands (each may take --ckpt_path), run by :class:`bnzoo.cli.lightning_cli.BnzooCLI`
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: every subcommand: ``name -> ("module:function", one-line help)``; the module is imported when the subcommand
#: runs, and the function takes the remaining arguments and returns an exit code. ``experiment`` is the claims
#: lab, an application shipped beside the library (``bnzoo_lab``), named here by string only.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("bnzoo.cli.lightning_cli:lightning_main", "train a model (LightningCLI; --ckpt_path last resumes)"),
    "validate": ("bnzoo.cli.lightning_cli:lightning_main", "evaluate a checkpoint on the validation split"),
    "test": ("bnzoo.cli.lightning_cli:lightning_main", "evaluate a checkpoint on the test split"),
    "predict": ("bnzoo.cli.lightning_cli:lightning_main", "predict with a checkpoint"),
    "recalibrate": ("bnzoo.cli.recalibrate:main", "recompute a checkpoint's norm statistics (Alg. 2)"),
    "export": ("bnzoo.cli.pretrained:export_main", "export a checkpoint's weights to safetensors"),
    "pretrained": ("bnzoo.cli.pretrained:pretrained_main", "list, describe and verify the pretrained zoo"),
    "experiment": ("bnzoo_lab.cli:main", "the claims lab: list, run and report experiments"),
}


def usage() -> str:
    """``bnzoo --help``: every subcommand with its one-line help."""
    from bnzoo import __version__

    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: bnzoo <subcommand> [options]   (bnzoo {__version__})", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`bnzoo <subcommand> --help` shows a subcommand's options; BNZOO_DEBUG=1 shows tracebacks."]
    return "\n".join(lines)


def _subcommand(name: str) -> Callable[[list[str]], int]:
    module_name, function = SUBCOMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module_name), function)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnzoo`` console script."""
    from .errors import UsageError, run_command

    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from bnzoo import __version__

        print(f"bnzoo {__version__}")
        return 0
    name = argv[0]
    prog = f"bnzoo {name}" if name in SUBCOMMANDS else "bnzoo"

    def command() -> int:
        if name not in SUBCOMMANDS:
            from bnzoo.registry import closest

            raise UsageError(
                f"unknown subcommand {name!r}{closest(name, SUBCOMMANDS)}; valid: {', '.join(SUBCOMMANDS)}"
            )
        if name in LIGHTNING_SUBCOMMANDS:  # LightningCLI parses the subcommand itself
            return _subcommand(name)(argv if args is not None else None)
        return _subcommand(name)(argv[1:])

    return run_command(prog, command)


if __name__ == "__main__":
    sys.exit(main())
