"""Per norm layer, histograms of gamma, beta, the running mean and the running variance; for Batch Renorm
(Ioffe 2017, Alg. 1) the mean correction factors r and d and the fraction of channels whose r or d was clipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checks import check_positive_int
from ..norms.introspect import named_norm_layers, named_renorm_layers, normalized_rows, renorm_correction_stats
from ._logging import log_histograms, log_scalars, logging_step, short_name

__all__ = ["NormStatistics"]


class NormStatistics(Callback):
    """Histograms of every norm layer's parameters and statistics; Batch Renorm's corrections as scalars.

    Every ``every_n_steps`` optimizer steps, for each norm layer
    (:func:`bnzoo.norms.introspect.named_norm_layers`) the TensorBoard histograms ``norm/<layer>/weight``,
    ``bias``, ``running_mean`` and ``running_var`` (those the layer has).
    For each Batch Renorm layer (Ioffe 2017, Alg. 1) the scalars ``norm/<layer>/r_mean``, ``d_mean``,
    ``r_clipped`` and ``d_clipped`` of that step's training batch
    (:func:`bnzoo.norms.introspect.renorm_correction_stats`),
    computed by a forward pre-hook from the layer's input and its running statistics before the update -- so
    they do not depend on the layer's ``record_corrections`` flag or on :class:`RenormSchedule`. Under NormSync
    they are each process's own batch's, not the global batch's.

    Args:
        every_n_steps: how often, in optimizer steps.
        histograms: log the parameter and statistics histograms.
        renorm_corrections: log the Batch Renorm scalars.

    ``history`` holds one dict per logging step: ``{"step", "<layer>/r_mean": ..., ...}`` (the scalars only).
    """

    PARAMETERS = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, every_n_steps: int = 100, histograms: bool = True, renorm_corrections: bool = True) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.histograms = histograms
        self.renorm_corrections = renorm_corrections
        self.history: list[dict[str, Any]] = []
        self._handles: list[RemovableHandle] = []
        self._step: int | None = None
        self._pending: set[str] = set()
        self._corrections: dict[str, dict[str, float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.renorm_corrections:
            return
        for name, layer in named_renorm_layers(pl_module).items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(short_name(name)), with_kwargs=True))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def record(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in self._pending and layer.training:
                self._pending.discard(name)
                self._corrections[name] = renorm_correction_stats(layer, normalized_rows(layer, args, kwargs))

        return record

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = logging_step(trainer, self.every_n_steps)
        if self.renorm_corrections and self._step is not None:
            self._pending = {short_name(name) for name in named_renorm_layers(pl_module)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._pending = set()
        step, self._step = self._step, None
        corrections, self._corrections = self._corrections, {}
        if step is None:
            return
        if self.histograms:
            values = {
                f"norm/{name}/{attribute}": tensor
                for name, layer in {short_name(n): m for n, m in named_norm_layers(pl_module).items()}.items()
                for attribute in self.PARAMETERS
                if isinstance(tensor := getattr(layer, attribute, None), Tensor)
            }
            log_histograms(trainer, values, step)
        if corrections:
            scalars = {f"norm/{name}/{k}": v for name, stats in corrections.items() for k, v in stats.items()}
            self.history.append({"step": step, **{k.removeprefix("norm/"): v for k, v in scalars.items()}})
            log_scalars(trainer, scalars, step)


# ----------------------------------------------------------------------------------------------------------
# The loss landscape along the gradient (Santurkar et al. 2018)
