"""Diagnostics of normalization for TensorBoard: activation percentiles, norm statistics, the loss landscape.

* :class:`ActivationPercentiles` -- the 15th, 50th and 85th percentiles of chosen units' inputs over training,
  Ioffe & Szegedy 2015, Fig. 1(b, c) ("the distribution of inputs to a typical sigmoid ... shown as {15, 50,
  85}th percentiles"), as scalars, plus a histogram of each unit's values.
* :class:`NormStatistics` -- per norm layer, histograms of gamma, beta, the running mean and the running variance;
  for Batch Renorm (Ioffe 2017, Alg. 1) the mean correction factors r and d and the fraction of channels whose
  r or d was clipped.
* :class:`LandscapeProbe` -- Santurkar et al. 2018 ("How Does Batch Normalization Help Optimization?",
  Sec. 3.1, Fig. 4): along the current gradient direction, at a few step sizes, the range of loss values, the
  l2 change of the gradient ("gradient predictiveness") and the effective beta-smoothness.

Each writes through the trainer's loggers (histograms only to TensorBoard loggers) every ``every_n_steps``
optimizer steps, and keeps what it logged in ``history`` (a list of plain dicts), so a script can read the
numbers without parsing event files. Outside a logging step none of them does any work.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from ..norms import FrozenBatchNorm, batch_renorm_corrections
from .recalibrate import normalized_rows
from .renorm_schedule import renorm_layers

__all__ = [
    "ActivationPercentiles",
    "LandscapeProbe",
    "NormStatistics",
    "norm_layers",
    "probe_along_gradient",
    "renorm_correction_stats",
    "task_loss",
    "unit_percentiles",
]

#: bins of every histogram: TensorBoard's default ("tensorflow", ~1500 exponential bins) costs ~2 ms per histogram
#: on a CPU, 64 equal bins ~0.3 ms
HISTOGRAM_BINS = 64

#: the norm layer types whose parameters and statistics :class:`NormStatistics` reports
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, FrozenBatchNorm, nn.GroupNorm, nn.LayerNorm)


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_every(every_n_steps: Any) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
    return every_n_steps


def _short_name(name: str) -> str:
    """A module's name as a user reads it: without the task's ``model.`` prefix."""
    return name.removeprefix("model.")


def _logging_step(trainer: L.Trainer, every_n_steps: int) -> int | None:
    """The optimizer step about to run, if it is one to log (called at the start of a training batch: the step
    counter advances after the optimizer step, before ``on_train_batch_end``); else None."""
    step = trainer.global_step
    return step if not trainer.sanity_checking and step % every_n_steps == 0 else None


def _log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _log_histograms(trainer: L.Trainer, values: dict[str, Tensor], step: int) -> None:
    """Histograms to every TensorBoard logger of the trainer (other loggers have no histograms)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, tensor in values.items():
                logger.experiment.add_histogram(tag, tensor.detach().float().cpu(), step, bins=HISTOGRAM_BINS)


def _named_submodules(root: nn.Module, names: Sequence[str], what: str) -> dict[str, nn.Module]:
    """``{name: module}`` for each of ``names``; an unknown name fails with the closest valid ones."""
    available = dict(root.named_modules())
    found = {}
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=5, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(f"{what}: the model has no module {name!r}{hint}")
        found[name] = available[name]
    return found


# ----------------------------------------------------------------------------------------------------------
# Activation percentiles (Ioffe & Szegedy 2015, Fig. 1)


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


class ActivationPercentiles(Callback):
    """Percentiles of chosen units' values over training (Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1(b, c)).

    Every ``every_n_steps`` optimizer steps, a forward hook on each module of ``modules`` takes the values of the
    chosen ``units`` in that training batch -- the module's input (``on="input"``: e.g. the input of a sigmoid,
    which is what Fig. 1 plots) or its output -- and logs for each unit the scalars
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
        self.every_n_steps = _check_every(every_n_steps)
        self.on = on
        self.histograms = histograms
        self.dim = dim
        self.history: list[dict[str, Any]] = []
        self._handles: list[RemovableHandle] = []
        self._step: int | None = None  # the step being recorded
        self._pending: set[str] = set()  # modules still to record in this step
        self._captured: dict[str, Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = _named_submodules(pl_module, self.modules, type(self).__name__)
        for name, module in found.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

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
            self._captured[name] = value.detach()

        return record

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = _logging_step(trainer, self.every_n_steps)
        self._pending = set(self.modules) if self._step is not None else set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._pending = set()
        step, self._step = self._step, None
        captured, self._captured = self._captured, {}
        if step is None or not captured:
            return
        scalars: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        for name, value in captured.items():
            table = unit_percentiles(value, self.units, self.percentiles, self.dim).tolist()
            module = _short_name(name)
            for unit, row in zip(self.units, table, strict=True):
                record: dict[str, Any] = {"step": step, "module": module, "unit": unit}
                for p, v in zip(self.percentiles, row, strict=True):
                    key = f"p{p:g}"
                    record[key] = v
                    scalars[f"activations/{module}/unit{unit}/{key}"] = v
                self.history.append(record)
                if self.histograms:
                    histograms[f"activations/{module}/unit{unit}"] = value.select(self.dim, unit)
        _log_scalars(trainer, scalars, step)
        _log_histograms(trainer, histograms, step)


# ----------------------------------------------------------------------------------------------------------
# Norm statistics


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Named norm layers of ``model``: BatchNorm and Batch Renorm (every layout), frozen BN, GroupNorm, LayerNorm."""
    return {_short_name(name): m for name, m in model.named_modules() if isinstance(m, NORM_TYPES)}


@torch.no_grad()
def renorm_correction_stats(layer: nn.Module, rows: Tensor) -> dict[str, float]:
    """The corrections a Batch Renorm ``layer`` applies to a batch (Ioffe 2017, Alg. 1), before its update.

    ``rows`` is what the layer normalizes: an (N, C, *) input, or a sequence's valid (M, C) rows. Returns the
    mean of ``r`` and of ``d`` over channels (after clipping) and the fraction of channels whose unclipped
    ``sigma_B / sigma`` lies outside ``[1/r_max, r_max]`` or ``(mu_B - mu) / sigma`` outside ``[-d_max, d_max]``.
    """
    mean, var = torch.batch_norm_update_stats(rows.float(), None, None, 0.0)
    batch_std = (var + layer.eps).sqrt()
    running_std = (layer.running_var + layer.eps).sqrt()
    r, d = batch_renorm_corrections(mean, batch_std, layer.running_mean, running_std, layer.r_max, layer.d_max)
    raw_r = batch_std / running_std
    raw_d = (mean - layer.running_mean) / running_std
    return {
        "r_mean": float(r.mean()),
        "d_mean": float(d.mean()),
        "r_clipped": float(((raw_r > layer.r_max) | (raw_r < 1.0 / layer.r_max)).float().mean()),
        "d_clipped": float((raw_d.abs() > layer.d_max).float().mean()),
    }


class NormStatistics(Callback):
    """Histograms of every norm layer's parameters and statistics; Batch Renorm's corrections as scalars.

    Every ``every_n_steps`` optimizer steps, for each norm layer (see :func:`norm_layers`) the TensorBoard
    histograms ``norm/<layer>/weight``, ``bias``, ``running_mean`` and ``running_var`` (those the layer has).
    For each Batch Renorm layer (Ioffe 2017, Alg. 1) the scalars ``norm/<layer>/r_mean``, ``d_mean``,
    ``r_clipped`` and ``d_clipped`` of that step's training batch (see :func:`renorm_correction_stats`),
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
        self.every_n_steps = _check_every(every_n_steps)
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
        for name, layer in renorm_layers(pl_module).items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(_short_name(name)), with_kwargs=True))

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
        self._step = _logging_step(trainer, self.every_n_steps)
        if self.renorm_corrections and self._step is not None:
            self._pending = {_short_name(name) for name in renorm_layers(pl_module)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._pending = set()
        step, self._step = self._step, None
        corrections, self._corrections = self._corrections, {}
        if step is None:
            return
        if self.histograms:
            values = {
                f"norm/{name}/{attribute}": tensor
                for name, layer in norm_layers(pl_module).items()
                for attribute in self.PARAMETERS
                if isinstance(tensor := getattr(layer, attribute, None), Tensor)
            }
            _log_histograms(trainer, values, step)
        if corrections:
            scalars = {f"norm/{name}/{k}": v for name, stats in corrections.items() for k, v in stats.items()}
            self.history.append({"step": step, **{k.removeprefix("norm/"): v for k, v in scalars.items()}})
            _log_scalars(trainer, scalars, step)


# ----------------------------------------------------------------------------------------------------------
# The loss landscape along the gradient (Santurkar et al. 2018)


def task_loss(pl_module: nn.Module, batch: Any) -> Tensor:
    """The training loss of ``batch`` without logging: the module's own ``batch_loss(batch)`` when it has one,
    else the cross-entropy of its main output for a task with ``split_batch`` (bnzoo's tasks), with the task's
    ``label_smoothing``."""
    batch_loss = getattr(pl_module, "batch_loss", None)
    if callable(batch_loss):
        return batch_loss(batch)
    split = getattr(pl_module, "split_batch", None)
    if not callable(split):
        raise TypeError(
            f"{type(pl_module).__name__} has neither batch_loss(batch) nor split_batch(batch): LandscapeProbe "
            "cannot compute its loss"
        )
    inputs, target = split(batch)
    output = pl_module(*inputs)
    if isinstance(output, (tuple, list)):
        output = output[0]
    hparams = getattr(pl_module, "hparams", {})
    return F.cross_entropy(output, target, label_smoothing=float(hparams.get("label_smoothing", 0.0)))


def probe_along_gradient(
    params: Sequence[Tensor], grads: Sequence[Tensor], loss_closure: Callable[[], Tensor], step_sizes: Sequence[float]
) -> dict[str, Any]:
    """Loss and gradient at ``w - eta * g`` for each step size ``eta`` (Santurkar et al. 2018, Sec. 3.1).

    ``params`` (w) are set in place to each probe point and restored afterwards; ``grads`` (g) is the gradient
    at w; ``loss_closure()`` returns the loss at the current parameters. Returns:

    * ``losses``: L(w - eta g) per step size; ``loss_min``, ``loss_max``, ``loss_range`` (max - min): the
      variation of the loss along the gradient (their Fig. 4(a));
    * ``grad_changes``: ||grad L(w - eta g) - g||_2 per step size, with ``grad_change_min`` and
      ``grad_change_max`` -- "gradient predictiveness" (Fig. 4(b));
    * ``beta_smoothness``: max over eta of ||grad L(w - eta g) - g||_2 / ||eta g||_2, the "effective"
      beta-smoothness (Fig. 4(c));
    * ``grad_norm``: ||g||_2.
    """
    if not step_sizes or any(not eta > 0 for eta in step_sizes):
        raise ValueError(f"step_sizes must be positive numbers, got {list(step_sizes)!r}")
    start = [p.detach().clone() for p in params]
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    losses, changes, smoothness = [], [], []
    try:
        for eta in step_sizes:
            with torch.no_grad():
                for p, w, g in zip(params, start, grads, strict=True):
                    p.copy_(w - eta * g)
            with torch.enable_grad():
                loss = loss_closure()
                new_grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            change = math.sqrt(
                sum(
                    float(g.double().square().sum() if ng is None else (ng - g).double().square().sum())
                    for ng, g in zip(new_grads, grads, strict=True)
                )
            )
            losses.append(float(loss.detach()))
            changes.append(change)
            smoothness.append(change / (eta * grad_norm) if grad_norm > 0 else 0.0)
    finally:
        with torch.no_grad():
            for p, w in zip(params, start, strict=True):
                p.copy_(w)
    return {
        "grad_norm": grad_norm,
        "losses": losses,
        "loss_min": min(losses),
        "loss_max": max(losses),
        "loss_range": max(losses) - min(losses),
        "grad_changes": changes,
        "grad_change_min": min(changes),
        "grad_change_max": max(changes),
        "beta_smoothness": max(smoothness),
    }


@contextmanager
def _frozen_state(module: nn.Module):
    """Run probe passes that leave no trace. Yields ``reset()``, which puts the buffers (running statistics,
    counters) and the random number generators back to their state on entry: called before every probe pass,
    each pass sees the same running statistics (which Batch Renorm uses in training) and draws the same dropout
    masks and noise. On exit the buffers, the generators and Batch Renorm's recorded corrections are restored."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    recording = {m: m.record_corrections for m in module.modules() if hasattr(m, "record_corrections")}
    recorded = {m: (getattr(m, "last_r", None), getattr(m, "last_d", None)) for m in recording}
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"})

    @torch.no_grad()
    def restore_buffers() -> None:
        for buffer, saved in buffers:
            buffer.copy_(saved)

    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def reset() -> None:
            restore_buffers()
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, d)

        for m in recording:
            m.record_corrections = False
        try:
            yield reset
        finally:
            restore_buffers()
            for m, flag in recording.items():
                m.record_corrections = flag
                m.last_r, m.last_d = recorded[m]


class LandscapeProbe(Callback):
    """The loss landscape along the gradient (Santurkar et al. 2018, Sec. 3.1, Fig. 4), every k steps.

    On a probe step, after the backward pass and before the optimizer step, the parameters are moved to
    ``w - eta * g`` for each of ``step_sizes`` (g: the training gradient of the step's batch; no momentum, no
    weight decay) and the loss and gradient of the *same batch* are computed there (see
    :func:`probe_along_gradient`). The network stays in training mode, as the optimizer sees it (batch
    statistics for BN); every probe pass uses the same dropout masks and noise; parameters, gradients, running
    statistics and random generators are restored afterwards, so a run with the probe trains exactly like one
    without it. Cost: ``len(step_sizes)`` extra forward and backward passes on probe steps only.

    Logged scalars: ``landscape/loss_min``, ``loss_max``, ``loss_range``, ``grad_change_min``,
    ``grad_change_max``, ``beta_smoothness``, ``grad_norm``. The loss is :func:`task_loss` (a module's own
    ``batch_loss(batch)``, else the cross-entropy of a bnzoo task).

    Args:
        every_n_steps: how often, in optimizer steps.
        step_sizes: the multiples eta of the gradient to probe; Santurkar et al. use eta in [0.05, 0.4].

    ``history`` holds the dict of :func:`probe_along_gradient` (plus ``"step"``) of every probe step.
    """

    def __init__(self, every_n_steps: int = 50, step_sizes: list[float] = (0.05, 0.1, 0.2, 0.4)) -> None:  # type: ignore[assignment]
        self.every_n_steps = _check_every(every_n_steps)
        self.step_sizes = [float(eta) for eta in step_sizes]
        if not self.step_sizes or any(not eta > 0 for eta in self.step_sizes):
            raise ValueError(f"step_sizes must be a non-empty list of positive numbers, got {step_sizes!r}")
        self.history: list[dict[str, Any]] = []
        self._step: int | None = None
        self._batch: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "LandscapeProbe needs the gradient of one batch: accumulate_grad_batches must be 1, got "
                f"{trainer.accumulate_grad_batches}"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = _logging_step(trainer, self.every_n_steps)
        self._batch = batch if self._step is not None else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        params = [p for p in pl_module.parameters() if p.grad is not None]
        if not params:
            return
        grads = [p.grad.detach().clone() for p in params]
        with _frozen_state(pl_module) as reset:

            def closure() -> Tensor:
                reset()
                return task_loss(pl_module, batch)

            result = probe_along_gradient(params, grads, closure, self.step_sizes)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.history.append({"step": self._step, **result})
        _log_scalars(trainer, {f"landscape/{k}": v for k, v in result.items() if isinstance(v, float)}, self._step)
