"""The 15th, 50th and 85th percentiles of chosen units' inputs over training (Ioffe & Szegedy 2015, Fig. 1(b,
c): "the distribution of inputs to a typical sigmoid ... shown as {15, 50, 85}th percentiles"), as scalars, plus a
histogram of each unit's values. The values come from the training batch (in training mode) or, with ``probe=n``,
from a fixed held-out batch of n validation samples run in eval mode at each logging step (as Fig. 1 follows the
network's response to the same inputs over training, unaffected by which training batch a step drew)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checks import check_positive_int
from ._logging import log_histograms, log_scalars, logging_step, named_submodules, short_name
from .recalibrate import run_model

__all__ = ["ActivationPercentiles", "take_samples", "unit_percentiles"]


def unit_percentiles(x: Tensor, units: Sequence[int], percentiles: Sequence[float], dim: int = 1) -> Tensor:
    """Percentiles of each unit's values in a batch: a (len(units), len(percentiles)) float64 tensor.

    A unit is an index along dimension ``dim`` of ``x`` -- a feature of (N, C) inputs or a channel of (N, C, *)
    feature maps with ``dim=1``, a feature of (B, T, C) sequences with ``dim=-1`` -- whose values are taken over
    every other dimension (the batch, positions, time steps). Percentiles are in [0, 100], with linear
    interpolation between order statistics (``torch.quantile``'s and numpy's default).
    """
    if x.dim() < 2:
        raise ValueError(f"expected a tensor with a batch and a unit dimension, got shape {tuple(x.shape)}")
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float64, device=x.device)
    values = x.detach().movedim(dim, 0).index_select(0, torch.as_tensor(list(units), device=x.device))
    return torch.quantile(values.reshape(len(units), -1).double(), q, dim=1).T


def take_samples(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch: every tensor of a tensor / tuple / list / dict batch sliced along
    dimension 0 (other values kept as they are)."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(take_samples(b, n) for b in batch)
    if isinstance(batch, dict):
        return {k: take_samples(v, n) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    first = batch if isinstance(batch, Tensor) else next(iter(batch.values() if isinstance(batch, dict) else batch))
    if not isinstance(first, Tensor):
        raise ValueError(f"ActivationPercentiles(probe=...): cannot find the batch size of a {type(batch).__name__}")
    return first.shape[0]


class ActivationPercentiles(Callback):
    """Percentiles of chosen units' values over training (Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1(b, c)).

    Every ``every_n_steps`` optimizer steps, a forward hook on each module of ``modules`` takes the values of the
    chosen ``units`` in that training batch (with ``probe``: in a fixed probe batch) -- the module's input
    (``on="input"``: e.g. the input of a sigmoid, which is what Fig. 1 plots) or its output -- and logs for each
    unit the scalars
    ``activations/<module>/unit<k>/p<percentile>`` and the histogram ``activations/<module>/unit<k>``. Only the
    module's first call of the step is recorded (not the extra forward passes of, e.g., :class:`LandscapeProbe`).

    Args:
        modules: module names inside the LightningModule, e.g. ``"model.blocks.2.act"`` (the MLP's last
            sigmoid); a wrong name fails at the start of training with the closest valid names.
        units: the units (indices along dimension 1: features or channels) to follow, or an int n for the first n.
        percentiles: in [0, 100]; Fig. 1 uses 15, 50, 85.
        every_n_steps: how often, in optimizer steps.
        on: ``"input"`` or ``"output"`` of each module.
        histograms: also log a TensorBoard histogram of each unit's values.
        dim: the dimension that indexes units: 1 for (N, C) and (N, C, *) tensors, -1 for (B, T, C) sequences.
        probe: None (default): the values of the training batch, in training mode (a norm layer then uses that
            batch's own statistics, so a BN network's units are standardized by construction). An int n: the
            first n samples of the validation set (the datamodule's ``val_dataloader``, taken once at the start
            of training, so always the same inputs) run through the model in eval mode (running statistics,
            dropout off, no gradients) after the optimizer step of each logging step -- the network's
            inference-time response to fixed held-out inputs, as Ioffe & Szegedy's Fig. 1 plots it.

    ``history`` holds ``{"step", "module", "unit", "p15": ..., "p50": ..., ...}`` per unit and logging step.
    """

    def __init__(
        self,
        modules: str | list[str],
        units: int | list[int] = 1,
        percentiles: list[float] = (15.0, 50.0, 85.0),  # type: ignore[assignment]
        every_n_steps: int = 50,
        on: str = "input",
        histograms: bool = True,
        dim: int = 1,
        probe: int | None = None,
    ) -> None:
        self.modules = [modules] if isinstance(modules, str) else list(modules)
        if not self.modules or not all(isinstance(m, str) for m in self.modules):
            raise ValueError(f"modules must be a module name or a non-empty list of them, got {modules!r}")
        if isinstance(units, int) and not isinstance(units, bool):
            if units < 1:
                raise ValueError(f"units must be a positive int (the first n units) or a list of indices, got {units}")
            self.units = list(range(units))
        else:
            self.units = list(units)
            if not self.units or any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in self.units):
                raise ValueError(f"units must be a positive int or a list of unit indices >= 0, got {units!r}")
        self.percentiles = [float(p) for p in percentiles]
        if not self.percentiles or not all(0.0 <= p <= 100.0 for p in self.percentiles):
            raise ValueError(f"percentiles must be numbers in [0, 100], got {percentiles!r}")
        if on not in ("input", "output"):
            raise ValueError(f"on must be 'input' or 'output', got {on!r}")
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.on = on
        self.histograms = histograms
        self.dim = dim
        self.probe = None if probe is None else check_positive_int("probe", probe)
        self._probe_batches: list[Any] = []
        self.history: list[dict[str, Any]] = []
        self._handles: list[RemovableHandle] = []
        self._step: int | None = None  # the step being recorded
        self._pending: set[str] = set()  # modules still to record in this step
        self._captured: dict[str, list[Tensor]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = named_submodules(pl_module, self.modules, type(self).__name__)
        for name, module in found.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe is None:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ValueError(
                f"ActivationPercentiles(probe={self.probe}) takes its probe batch from the datamodule's "
                "val_dataloader(); this fit has no datamodule (use probe=None for the training batch)"
            )
        self._probe_batches, remaining = [], self.probe
        for batch in datamodule.val_dataloader():
            batch = take_samples(batch, remaining)
            self._probe_batches.append(batch)
            remaining -= _batch_size(batch)
            if remaining <= 0:
                break
        if remaining > 0:
            raise ValueError(f"ActivationPercentiles: probe={self.probe} but the validation set has only "
                             f"{self.probe - remaining} samples")  # fmt: skip

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if name not in self._pending:
                return
            self._pending.discard(name)
            value = inputs[0] if self.on == "input" else output
            units = value.shape[self.dim] if value.dim() > 1 else 0
            if max(self.units) >= units:
                raise ValueError(
                    f"ActivationPercentiles: {name!r} has {units} units (dimension {self.dim} of its {self.on} of "
                    f"shape {tuple(value.shape)}); asked for units {self.units}"
                )
            self._captured.setdefault(name, []).append(value.detach())

        return record

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = logging_step(trainer, self.every_n_steps)
        self._pending = set(self.modules) if self._step is not None and self.probe is None else set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._pending = set()
        step, self._step = self._step, None
        if step is not None and self.probe is not None:
            self._run_probe(pl_module)
        captured, self._captured = self._captured, {}
        if step is None or not captured:
            return
        scalars: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        for name, chunks in captured.items():
            # the probe's batches as one batch of units: (samples, units) rows, then the units along dimension 1
            value = (
                chunks[0]
                if len(chunks) == 1
                else torch.cat([c.movedim(self.dim, -1).reshape(-1, c.shape[self.dim]) for c in chunks])
            )
            dim = self.dim if len(chunks) == 1 else 1
            table = unit_percentiles(value, self.units, self.percentiles, dim).tolist()
            module = short_name(name)
            for unit, row in zip(self.units, table, strict=True):
                record: dict[str, Any] = {"step": step, "module": module, "unit": unit}
                for p, v in zip(self.percentiles, row, strict=True):
                    key = f"p{p:g}"
                    record[key] = v
                    scalars[f"activations/{module}/unit{unit}/{key}"] = v
                self.history.append(record)
                if self.histograms:
                    histograms[f"activations/{module}/unit{unit}"] = value.select(dim, unit)
        log_scalars(trainer, scalars, step)
        log_histograms(trainer, histograms, step)

    @torch.no_grad()
    def _run_probe(self, pl_module: L.LightningModule) -> None:
        """The probe batches through the model in eval mode, each module's first call per batch recorded."""
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            for batch in self._probe_batches:
                self._pending = set(self.modules)
                run_model(pl_module, batch)
        finally:
            self._pending = set()
            for module, mode in modes.items():
                module.train(mode)
