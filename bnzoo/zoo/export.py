"""Exporting zoo checkpoints: a network's weights as safetensors (with bnzoo's metadata, so they load back with
``load_pretrained``), and the README's table of the zoo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..io import atomic_write_bytes
from ..models.registry import build_model, model_options
from ..norms.factory import norm_factory
from ..norms.fusion import FoldReport, fold_norms
from .checkpoint import SAFETENSORS_METADATA_KEY, Checkpoint, load_checkpoint, load_network_state
from .compatibility import describe, network_options, plain
from .index import SAFETENSORS_SUFFIX, read_index

__all__ = ["export_safetensors", "fuse_checkpoint", "fused_hyperparameters", "zoo_table"]


# -- export -----------------------------------------------------------------------------------------------------
def export_safetensors(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    fuse: bool = False,
) -> Path:
    """Write a checkpoint's network weights as safetensors (keys of the bare network: ``create_model(...)
    .load_state_dict(safetensors.torch.load_file(path))`` works), with the task's hyperparameters as JSON in
    the metadata (so ``load_pretrained``/``create_model(pretrained=path)`` can rebuild it). Default output:
    ``<checkpoint name>.safetensors`` (``<name>-fused.safetensors`` with ``fuse``) in the working directory.
    Written atomically.

    ``fuse``: the norms folded into the convolutions before them (:func:`fuse_checkpoint`); the file then holds
    the ``norm="none"`` network, which its hyperparameters name."""
    from safetensors.torch import save as save_safetensors

    checkpoint = load_checkpoint(source, sha256=sha256, cache_dir=cache_dir)
    default_name = checkpoint.path.stem + ("-fused" if fuse else "") + SAFETENSORS_SUFFIX
    target = Path(output) if output is not None else Path(default_name)
    if target.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"the output file must end in {SAFETENSORS_SUFFIX}, got {str(target)!r}")
    hparams, state = checkpoint.hparams, checkpoint.state_dict
    bnzoo_metadata: dict[str, Any] = {"source": checkpoint.label}
    if fuse:
        state, hparams, report = fuse_checkpoint(checkpoint)
        fused_from = {"norm": checkpoint.hparams.get("norm"), "norm_options": checkpoint.hparams.get("norm_options")}
        bnzoo_metadata["fused"] = {**fused_from, "layers": report.fused}
    bnzoo_metadata["hyper_parameters"] = {k: v for k, v in hparams.items() if k != "_instantiator"}
    metadata = {"format": "pt", SAFETENSORS_METADATA_KEY: json.dumps(bnzoo_metadata)}
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    atomic_write_bytes(target, save_safetensors(tensors, metadata))
    return target


# -- fused export -------------------------------------------------------------------------------------------------
def fused_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """A task's hyperparameters with its norms folded away: ``norm="none"``, no norm options, and a ``skip_init``
    option (whose default is on exactly for ``none``) pinned to what the normalized network had."""
    fused = {**hparams, "norm": "none", "norm_options": {}}
    if "skip_init" in model_options(hparams["model"]):
        options = dict(hparams.get("model_options") or {})
        if options.get("skip_init") is None:  # the default: on exactly when the norm is the identity
            options["skip_init"] = norm_factory(hparams.get("norm", "bn"), hparams.get("norm_options")).is_identity
        fused["model_options"] = options
    return fused


def fuse_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Any], FoldReport]:
    """The checkpoint's network with every norm folded into the conv/linear layer before it
    (:func:`bnzoo.norms.fold_norms`): ``(state dict, hyperparameters of the norm="none" network, report)``.

    Refused (a ValueError naming them) when a norm cannot be folded, or when the fused weights do not load
    strictly into the ``norm="none"`` build of the architecture."""
    network = build_model(checkpoint.model, **checkpoint.network_options)
    load_network_state(network, checkpoint, checkpoint.describe())
    report = fold_norms(network.eval(), inplace=True)
    if report.skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped.items())
        raise ValueError(
            f"cannot export {checkpoint.label} fused: {len(report.skipped)} norm layers cannot be folded into a "
            f"convolution or linear layer ({reasons}); export it without --fuse"
        )
    hparams = fused_hyperparameters(checkpoint.hparams)
    options = network_options(hparams)
    state = network.state_dict()
    try:
        build_model(hparams["model"], **options).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"cannot export {checkpoint.label} fused: its folded weights do not fit "
            f"{describe(hparams['model'], options)} (the architecture without norms): {str(err).splitlines()[0]}"
        ) from err
    return state, hparams, report


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
