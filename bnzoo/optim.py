"""Optimizer and learning-rate schedule defaults of bnzoo's tasks (SGD with momentum, warm-up, cosine or step).

Everything here is built from plain hyperparameters, so that a task's configuration round-trips through
YAML and its checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["SCHEDULES", "WarmupSchedule", "parameter_groups"]

SCHEDULES = ("cosine", "step", "constant")


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False
) -> list[dict[str, object]]:
    """Two SGD parameter groups: weights with ``weight_decay``, and norm scales/shifts and biases without.

    Decaying BN's gamma and beta pulls the normalized activations towards zero for no benefit; timm and most
    modern recipes exclude every parameter with fewer than two dimensions. ``decay_norm_and_bias=True`` decays
    all parameters, as He et al. 2015 did.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupSchedule:
    """Multiplier of the base learning rate at optimizer step ``t`` (for ``LambdaLR``, stepped every step).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps``; then ``cosine`` decays to 0 at
    ``total_steps`` (Loshchilov & Hutter 2017, without restarts), ``step`` multiplies by ``gamma`` at each
    fraction of ``total_steps`` in ``milestones`` (He et al. 2015: x0.1 at 50% and 75% of training), and
    ``constant`` keeps 1. A plain object, so its state saves with the scheduler's.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int,
        warmup_steps: int = 0,
        milestones: Iterable[float] = (0.5, 0.75),
        gamma: float = 0.1,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; valid schedules: {', '.join(SCHEDULES)}")
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.milestones = sorted(float(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        passed = sum(1 for m in self.milestones if step >= m * self.total_steps)
        return self.gamma**passed


def build_sgd(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    decay_norm_and_bias: bool = False,
) -> torch.optim.SGD:
    """SGD over :func:`parameter_groups`."""
    groups = parameter_groups(model, weight_decay, decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
