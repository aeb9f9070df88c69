"""Numbers of the claims lab as text: metric values, a side's mean and spread, a verdict's test, Markdown tables."""

from __future__ import annotations

import math
from typing import Any

from .metrics import Judgement, SideValues, metric_name

__all__ = [
    "ACCURACIES",
    "describe_side",
    "format_difference",
    "format_stat",
    "format_test",
    "format_value",
    "metric_label",
    "table",
]

#: metrics shown in % (their differences in points)
ACCURACIES = ("test_acc", "recalibrated_test_acc", "final_val_acc", "max_val_acc", "mean_val_acc")


def format_value(metric: str, value: float, censored: bool = False, digits: int = 3) -> str:
    """A metric's value as text: accuracies in %, gains in points, steps as integers, others to ``digits``
    significant digits; ``censored`` adds ">" (a lower bound)."""
    if math.isnan(value):
        return "n/a"
    mark = ">" if censored else ""
    if metric in ACCURACIES:
        return f"{mark}{100 * value:.1f}%"
    if metric == "recalibration_gain":
        return f"{mark}{100 * value:+.1f} pts"
    if metric == "steps_to_target":
        return f"{mark}{value:.0f}"
    return f"{mark}{value:.{digits}g}"


def format_difference(metric: str, value: float) -> str:
    """A difference of two means of ``metric``, signed: points for accuracies and gains, a rate of seeds for a 0/1
    metric, steps as integers."""
    if not math.isfinite(value):
        return "n/a"
    if metric in ACCURACIES or metric == "recalibration_gain":
        return f"{100 * value:+.1f} pts"
    if metric == "steps_to_target":
        return f"{value:+.0f}"
    if metric in ("diverged", "failed"):
        return f"{value:+.2f} (rate)"
    return f"{value:+.3g}"


def metric_label(metric: str | dict[str, Any]) -> str:
    """A metric as a reader names it, e.g. "steps to none's best val acc"."""
    name, params = metric_name(metric)
    if name == "steps_to_target":
        target = params.get("target")
        what = f"{target['max_val_acc_of']}'s best val acc" if isinstance(target, dict) else f"{target:.0%} val acc"
        return f"steps to {what}"
    if name == "landscape":
        return f"landscape {params.get('key', 'loss_range')}".replace("_", " ")
    return name.replace("_", " ")


def format_stat(metric: str, side: SideValues) -> str:
    """A side's numbers: "mean ± std" (with ">" for censored values), or "k/n" seeds for a 0/1 metric."""
    n = len(side.values)
    if metric in ("diverged", "failed"):
        return f"{sum(v > 0 for v in side.values):.0f}/{n} seeds"
    censored = sum(side.censored)
    text = format_value(metric, side.mean, censored == n and n > 0)
    if n > 1 and censored < n:
        text += " ± " + format_value(metric, side.std, digits=2).lstrip("+").replace(" pts", "")
    if 0 < censored < n:
        text += f" ({censored}/{n} never reached it)"
    return text


def describe_side(metric: str, side: SideValues) -> str:
    """A side as "label: numbers (n seeds)"; a constant as its value."""
    if side.constant:
        return side.label
    n = len(side.values)
    if metric in ("diverged", "failed"):
        what = "diverged" if metric == "diverged" else "failed (diverged or near chance)"
        return f"{side.label}: {format_stat(metric, side)} {what}"
    return f"{side.label}: {format_stat(metric, side)}" + (f" ({n} seeds)" if n > 1 else " (1 seed)")


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


def format_test(metric: str, judgement: Judgement) -> str:
    """The test behind a verdict: "Welch t, one-sided, p = 0.012; diff +2.1 pts, 90% CI [+0.9, +3.3] pts"."""
    if judgement.p_value is None:
        return judgement.note or "no test"
    test = judgement.test
    if judgement.bound:
        what = "within +-" if test.startswith("TOST") else "beyond "
        test += f" {what}{format_difference(metric, judgement.bound).lstrip('+')}"
    parts = [f"{test}, {_p(judgement.p_value)}"]
    diff = f"diff {format_difference(metric, judgement.difference)}"
    if judgement.interval is not None:
        low, high = (format_difference(metric, v) for v in judgement.interval)
        unit = " pts" if low.endswith(" pts") else ""
        diff += f", 90% CI [{low.removesuffix(' pts')}, {high.removesuffix(' pts')}]{unit}"
    return "; ".join([*parts, diff])


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    """A Markdown table's lines ("|" inside a cell becomes "/")."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
