"""Exporting zoo checkpoints: a network's weights as safetensors (with bnzoo's metadata, so they load back with
``load_pretrained``), and the README's table of the zoo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes
from .checkpoint import SAFETENSORS_METADATA_KEY, load_checkpoint
from .compatibility import plain
from .index import SAFETENSORS_SUFFIX, read_index


# -- export -----------------------------------------------------------------------------------------------------
def export_safetensors(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a checkpoint's network weights as safetensors (keys of the bare network: ``create_model(...)
    .load_state_dict(safetensors.torch.load_file(path))`` works), with the task's hyperparameters as JSON in
    the metadata (so ``load_pretrained``/``create_model(pretrained=path)`` can rebuild it). Default output:
    ``<checkpoint name>.safetensors`` in the working directory. Written atomically."""
    from safetensors.torch import save as save_safetensors

    checkpoint = load_checkpoint(source, sha256=sha256, cache_dir=cache_dir)
    target = Path(output) if output is not None else Path(checkpoint.path.stem + SAFETENSORS_SUFFIX)
    if target.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"the output file must end in {SAFETENSORS_SUFFIX}, got {str(target)!r}")
    hparams = {k: v for k, v in checkpoint.hparams.items() if k != "_instantiator"}
    bnzoo_metadata = {"source": checkpoint.label, "hyper_parameters": hparams}
    metadata = {"format": "pt", SAFETENSORS_METADATA_KEY: json.dumps(bnzoo_metadata)}
    tensors = {key: value.detach().contiguous() for key, value in checkpoint.state_dict.items()}
    atomic_write_bytes(target, save_safetensors(tensors, metadata))
    return target


# -- the zoo table ----------------------------------------------------------------------------------------------
def zoo_table(entries: list[dict[str, Any]] | None = None) -> str:
    """The README's zoo table (Markdown), rendered from the index: one row per checkpoint."""
    entries = read_index() if entries is None else entries
    rows = [
        "| checkpoint | architecture | norm | dataset | params | test acc. | steps | train time | size | config |",
        "|---|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for e in entries:
        options = ", ".join(f"{k}={plain(v)}" for k, v in e["model_options"].items())
        architecture = f"{e['model']} ({options})" if options else e["model"]
        train, test = e["train"], e["test"]
        cells = [
            f"`{e['name']}`",
            architecture,
            e["norm"],
            e["dataset"],
            f"{e['params'] / 1e3:.0f}k",
            f"{100 * test['acc']:.2f}%",
            f"{train['steps']} ({train['epochs']} ep.)",
            f"{train['wall_time_s'] / 60:.1f} min",
            f"{e['size_bytes'] / 2**20:.2f} MB",
            f"[{Path(e['config']).name}]({e['config']})",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
