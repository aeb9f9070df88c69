"""The Batch Renormalization schedule of Ioffe 2017, Sec. 4 (and its clipping diagnostics).

"We used r_max = 1, d_max = 0 (i.e. simply batchnorm) for the first 5000 training steps, after which these
were gradually relaxed to reach r_max = 3 at 40k steps, and d_max = 5 at 25k steps." Here both bounds rise
linearly from the end of the warm-up to their final values; step counts are integers, or fractions of the
run's total optimizer steps when given as floats in (0, 1]. A run resumed from a checkpoint continues the
schedule it was saved with, whatever the resumed run's ``max_steps``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..norms.introspect import named_renorm_layers

__all__ = ["RenormSchedule", "renorm_bounds"]


def renorm_bounds(
    step: int, warmup_steps: int, r_max_steps: int, d_max_steps: int, r_max: float, d_max: float
) -> tuple[float, float]:
    """``(r_max, d_max)`` at optimizer step ``step``: (1, 0) during warm-up, then linear to the final values."""

    def ramp(start: float, end: float, reach: int) -> float:
        if step < warmup_steps:
            return start
        if reach <= warmup_steps or step >= reach:
            return end
        return start + (end - start) * (step - warmup_steps) / (reach - warmup_steps)

    return ramp(1.0, r_max, r_max_steps), ramp(0.0, d_max, d_max_steps)


def _resolve(steps: int | float, total: int, name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps < 0:
        raise ValueError(f"{name} must be a step count >= 0 or a fraction of the run in (0, 1], got {steps!r}")
    if isinstance(steps, float):
        if steps > 1.0:
            raise ValueError(f"{name}={steps!r}: a float is a fraction of the run and must be <= 1")
        return round(steps * total)
    return steps


class RenormSchedule(Callback):
    """Set ``r_max``/``d_max`` of every renorm layer before each training step, and log them.

    Args:
        warmup_steps: steps of plain BatchNorm (r_max = 1, d_max = 0); paper: 5000.
        r_max_steps: step at which r_max reaches ``r_max``; paper: 40000.
        d_max_steps: step at which d_max reaches ``d_max``; paper: 25000.
        r_max, d_max: final bounds; paper: 3 and 5.
        log_bounds: every ``log_every_n_steps`` log ``renorm/r_max`` and ``renorm/d_max``. The per-layer
            corrections and the fraction of channels clipped are :class:`bnzoo.callbacks.NormStatistics`'s
            (``norm/<layer>/r_clipped``, one definition: :func:`bnzoo.norms.introspect.renorm_correction_stats`).

    Step counts that are floats in (0, 1] are fractions of the run's total optimizer steps, resolved when
    training starts. The resolved schedule is saved in checkpoints; a resumed run continues it (a fraction stays
    a fraction of the saved run, not of the resumed run's ``max_steps``), and bounds or step arguments that
    differ from the saved ones are named in a warning and not used.
    """

    def __init__(
        self,
        warmup_steps: int | float = 5000,
        r_max_steps: int | float = 40000,
        d_max_steps: int | float = 25000,
        r_max: float = 3.0,
        d_max: float = 5.0,
        log_bounds: bool = True,
    ) -> None:
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"final bounds must satisfy r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        for name, value in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            _resolve(value, 1, name)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.log_bounds = log_bounds
        self._steps: tuple[int, int, int] = (0, 0, 0)
        self._restored = False  # the schedule came from a checkpoint: on_train_start keeps it
        self._schedule_arguments = self._arguments()  # those of the schedule in effect (a checkpoint's, resumed)

    def _arguments(self) -> list[int | float]:
        return [self.warmup_steps, self.r_max_steps, self.d_max_steps, self.r_max, self.d_max]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        steps = (
            _resolve(self.warmup_steps, total, "warmup_steps"),
            _resolve(self.r_max_steps, total, "r_max_steps"),
            _resolve(self.d_max_steps, total, "d_max_steps"),
        )
        if self._restored:  # a resumed run continues the schedule it was saved with (see load_state_dict)
            self._restored = False
            if steps != self._steps:
                rank_zero_info(
                    f"RenormSchedule: continuing the saved schedule (warm-up {self._steps[0]}, r_max reached at "
                    f"{self._steps[1]}, d_max at {self._steps[2]} steps), not the {steps} this run's {total} "
                    "steps would give"
                )
        else:
            self._steps = steps
        if not named_renorm_layers(pl_module):
            rank_zero_warn("RenormSchedule: the model has no Batch Renorm layer; the schedule has nothing to set.")

    def bounds(self, step: int) -> tuple[float, float]:
        return renorm_bounds(step, *self._steps, self.r_max, self.d_max)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        r_max, d_max = self.bounds(trainer.global_step)
        for layer in named_renorm_layers(pl_module).values():
            layer.r_max, layer.d_max = r_max, d_max
        if self.log_bounds and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            for logger in trainer.loggers:
                logger.log_metrics({"renorm/r_max": r_max, "renorm/d_max": d_max}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The schedule as resolved for this run (plain types): its step counts, final bounds and arguments."""
        return {
            "steps": list(self._steps),
            "r_max": self.r_max,
            "d_max": self.d_max,
            "arguments": list(self._schedule_arguments),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved schedule: its resolved step counts (a fraction of the *saved* run's length, not of
        a resumed run's other ``max_steps``) and final bounds. Arguments that differ from the saved ones are
        named in a warning and not used."""
        if "steps" not in state_dict:
            return
        given, saved = self._arguments(), state_dict.get("arguments")
        self._steps = tuple(int(s) for s in state_dict["steps"])  # type: ignore[assignment]
        self.r_max = float(state_dict.get("r_max", self.r_max))
        self.d_max = float(state_dict.get("d_max", self.d_max))
        self._restored = True
        if saved is not None:
            self._schedule_arguments = list(saved)
        if saved is not None and list(saved) != given:
            names = ("warmup_steps", "r_max_steps", "d_max_steps", "r_max", "d_max")
            changed = ", ".join(
                f"{n}={new!r} (saved: {old!r})" for n, old, new in zip(names, saved, given, strict=True) if old != new
            )
            rank_zero_warn(f"RenormSchedule: the checkpoint's schedule is continued; ignoring {changed}")
