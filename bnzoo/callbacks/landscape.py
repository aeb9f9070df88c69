"""The loss landscape along the gradient (Santurkar et al. 2018, "How Does Batch Normalization Help
Optimization?", Sec. 3.1, Fig. 4): at a few step sizes along the current gradient, the range of loss values, the
l2 change of the gradient ("gradient predictiveness") and the effective beta-smoothness."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from ..checks import check_positive_int
from ._logging import log_scalars, logging_step

__all__ = ["LandscapeProbe", "probe_along_gradient"]


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
    ``grad_change_max``, ``beta_smoothness``, ``grad_norm``. The loss is the task's own ``batch_loss(batch)``
    (:meth:`bnzoo.tasks.ClassificationTask.batch_loss`, the auxiliary classifier's term included).

    Args:
        every_n_steps: how often, in optimizer steps.
        step_sizes: the multiples eta of the gradient to probe; Santurkar et al. use eta in [0.05, 0.4].

    ``history`` holds the dict of :func:`probe_along_gradient` (plus ``"step"``) of every probe step.
    """

    def __init__(self, every_n_steps: int = 50, step_sizes: list[float] = (0.05, 0.1, 0.2, 0.4)) -> None:  # type: ignore[assignment]
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.step_sizes = [float(eta) for eta in step_sizes]
        if not self.step_sizes or any(not eta > 0 for eta in self.step_sizes):
            raise ValueError(f"step_sizes must be a non-empty list of positive numbers, got {step_sizes!r}")
        self.history: list[dict[str, Any]] = []
        self._step: int | None = None
        self._batch: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "batch_loss", None)):
            raise TypeError(
                f"LandscapeProbe needs the task's loss: {type(pl_module).__name__} has no batch_loss(batch)"
            )
        if stage == "fit" and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "LandscapeProbe needs the gradient of one batch: accumulate_grad_batches must be 1, got "
                f"{trainer.accumulate_grad_batches}"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = logging_step(trainer, self.every_n_steps)
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
                return pl_module.batch_loss(batch)

            result = probe_along_gradient(params, grads, closure, self.step_sizes)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.history.append({"step": self._step, **result})
        log_scalars(trainer, {f"landscape/{k}": v for k, v in result.items() if isinstance(v, float)}, self._step)
