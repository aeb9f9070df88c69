"""`bnzoo pretrained` (list, info, verify, table) and `bnzoo export` (safetensors, optionally fused): the zoo from
the command line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..zoo.checkpoint import load_checkpoint
from ..zoo.export import export_safetensors, zoo_table
from ..zoo.index import entry_path, list_pretrained, pretrained_info, read_index, unknown_name_message
from .errors import TerseArgumentParser


# -- command line -----------------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    """``bnzoo export SOURCE [-o OUT.safetensors] [--sha256 HEX] [--fuse]``."""
    parser = TerseArgumentParser(
        prog="bnzoo export", description="Export a checkpoint's network weights to safetensors (with bnzoo metadata)."
    )
    parser.add_argument("source", help="a pretrained name (bnzoo pretrained list), a .ckpt path, or a URL")
    parser.add_argument("-o", "--output", help="the .safetensors file (default: <name>.safetensors here)")
    parser.add_argument("--sha256", help="the expected sha256 of a path or URL")
    parser.add_argument(
        "--fuse",
        action="store_true",
        help="fold every norm into the convolution or linear layer before it: the file holds the norm='none' "
        "network, for inference (refused when a norm cannot be folded)",
    )
    args = parser.parse_args(list(argv))
    print(export_safetensors(args.source, args.output, sha256=args.sha256, fuse=args.fuse))
    return 0


def verify_entry(entry: dict[str, Any]) -> str | None:
    """Why index entry ``entry`` fails :func:`load_checkpoint` (its file name, presence, sha256, a safe load, its
    hyperparameters), or None when it passes."""
    try:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"an index entry without a name (file {entry.get('file')!r})")
        entry_path(entry)
        load_checkpoint(name)
    except (ValueError, TypeError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def verify_main(names: Sequence[str]) -> int:
    """``bnzoo pretrained verify [NAME ...]``: one line per entry (``ok`` or ``FAILED`` and the reason), every entry
    checked; exit status 1 when any failed."""
    entries = read_index()
    if names:
        by_name = {e.get("name"): e for e in entries}
        entries = [by_name.get(name, {"name": name, "_unknown": True}) for name in names]
    failures = 0
    for index, entry in enumerate(entries):
        label = entry.get("name") if isinstance(entry.get("name"), str) else f"entry #{index}"
        reason = unknown_name_message(label) if entry.get("_unknown") else verify_entry(entry)
        failures += reason is not None
        print(f"ok      {label}" if reason is None else f"FAILED  {label}: {reason}")
    print(f"{len(entries) - failures} of {len(entries)} checkpoints verified")
    return 1 if failures else 0


def pretrained_main(argv: Sequence[str]) -> int:
    """``bnzoo pretrained list [PATTERN] | info NAME | verify [NAME ...] | table``."""
    parser = TerseArgumentParser(prog="bnzoo pretrained", description="The pretrained checkpoints of the zoo.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,info,verify,table}")
    commands.add_parser("list", help="names, test accuracy and size").add_argument("pattern", nargs="?", default="*")
    commands.add_parser("info", help="a checkpoint's index entry as JSON").add_argument("name")
    commands.add_parser("verify", help="check files against their sha256 and load them safely").add_argument(
        "names", nargs="*"
    )
    commands.add_parser("table", help="the README's zoo table (Markdown)")
    args = parser.parse_args(list(argv))
    if args.command == "list":
        for name in list_pretrained(args.pattern):
            entry = pretrained_info(name)
            print(f"{name:45s} test acc {100 * entry['test']['acc']:6.2f}%  {entry['size_bytes'] / 2**20:5.2f} MB")
    elif args.command == "info":
        print(json.dumps(pretrained_info(args.name), indent=2))
    elif args.command == "verify":
        return verify_main(args.names)
    else:
        print(zoo_table(), end="")
    return 0
