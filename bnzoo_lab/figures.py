"""One PNG per experiment, drawn from its results file: the panels of a spec's ``figure:`` list.

Each panel is a mapping with ``kind`` and an optional ``title``:

* ``curve``: ``series`` (``val_acc``, ``val_loss``, ``train_loss`` or ``landscape.<key>``) against the step, the mean
  over the seeds that did not diverge with their min-max band; options ``variants``, ``logy``, ``smooth``
  (moving-average window).
* ``band``: the seed-mean of ``lower`` and ``upper`` series filled between (Santurkar et al. 2018, Fig. 4).
* ``percentiles``: one axis per variant (``variants``) with the percentiles of ActivationPercentiles for the first
  seed and ``unit`` (Ioffe & Szegedy 2015, Fig. 1(b, c)).
* ``bars``: ``metric`` per variant, mean with the seeds' standard deviation and each seed as a dot.
* ``sweep``: ``metric`` against each variant's ``x``, one line per entry of ``groups`` (label -> variants);
  ``logx`` for a log axis.

Diverged seeds (a non-finite training loss) are shown as such, never silently left out of a mean: a curve draws
each of them as a thin dashed line ending in an "x" where it diverged, labelled "diverged (k/n)", and the mean is
over the other seeds (its label says how many); bars and sweeps mark a diverged seed's value with a red "x" and
say "k/n diverged" where a value is not finite.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from .formatting import ACCURACIES, metric_label  # noqa: E402
from .metrics import Results, metric_name, run_metric  # noqa: E402
from .spec import ExperimentSpec  # noqa: E402

__all__ = ["PANEL_KINDS", "diverged", "render_figure"]

PANEL_KINDS = ("curve", "band", "percentiles", "bars", "sweep")
COLORS = plt.get_cmap("tab10").colors


def diverged(run: dict[str, Any]) -> bool:
    """Whether the run's training loss became non-finite (:class:`~bnzoo_lab.recorder.MetricsRecorder`)."""
    return run.get("diverged_at") is not None


def _series(run: dict[str, Any], name: str) -> tuple[list[float], list[float]]:
    if name in ("val_acc", "val_loss"):
        column = 1 if name == "val_acc" else 2
        return [v[0] for v in run.get("val") or []], [v[column] for v in run.get("val") or []]
    if name == "train_loss":
        rows = run.get("train_loss") or []
        return [r[0] for r in rows], [r[1] for r in rows]
    if name.startswith("landscape."):
        key = name.split(".", 1)[1]
        rows = run.get("landscape") or []
        return [r["step"] for r in rows], [r[key] for r in rows]
    raise ValueError(f"unknown series {name!r}; valid: val_acc, val_loss, train_loss, landscape.<key>")


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else math.nan)
    return out


def _seed_stack(runs: list[dict[str, Any]], series: str, window: int = 1) -> tuple[list[float], list[list[float]]]:
    """The series of every seed on the longest run's steps (runs that stopped early are cut at their end)."""
    curves = [_series(run, series) for run in runs]
    steps = max((c[0] for c in curves), key=len, default=[])
    stacked = []
    for xs, ys in curves:
        lookup = dict(zip(xs, _smooth(ys, window), strict=True))
        stacked.append([lookup.get(x, math.nan) for x in steps])
    return steps, stacked


def _stats(columns: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    means, lows, highs = [], [], []
    for values in zip(*columns, strict=True):
        finite = [v for v in values if math.isfinite(v)]
        means.append(statistics.fmean(finite) if finite else math.nan)
        lows.append(min(finite) if finite else math.nan)
        highs.append(max(finite) if finite else math.nan)
    return means, lows, highs


def _color(spec: ExperimentSpec, variant: str) -> Any:
    """One color per variant, the same in every panel of the figure."""
    return COLORS[list(spec.variants).index(variant) % len(COLORS)]


def _panel_variants(panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> list[str]:
    wanted = panel.get("variants") or list(spec.variants)
    return [v for v in wanted if v in results.variants()]


def _split(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [r for r in runs if not diverged(r)], [r for r in runs if diverged(r)]


def _curve(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    series, window = panel["series"], int(panel.get("smooth", 1))
    for variant in _panel_variants(panel, spec, results):
        runs = results.runs(variant)
        kept, lost = _split(runs)
        color, label = _color(spec, variant), spec.variants[variant].label
        if kept:
            steps, stacked = _seed_stack(kept, series, window)
            mean, low, high = _stats(stacked)
            marker = "o" if len(steps) <= 12 else None
            text = label if not lost else f"{label} ({len(kept)} seed{'s' if len(kept) > 1 else ''})"
            ax.plot(steps, mean, color=color, label=text, lw=1.4, marker=marker, ms=3)
            if len(stacked) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
        for index, run in enumerate(lost):
            xs, ys = _series(run, series)
            pairs = [(x, y) for x, y in zip(xs, _smooth(ys, window), strict=True) if math.isfinite(y)]
            text = f"{label}: diverged ({len(lost)}/{len(runs)})" if index == 0 else None
            if pairs:
                ax.plot(*zip(*pairs, strict=True), color=color, lw=0.8, ls="--", label=text)
                ax.plot(*pairs[-1], "x", color=color, ms=7, mew=2)
            elif text:
                ax.plot([], [], color=color, lw=0.8, ls="--", label=text + ", no finite value")
    ax.set_xlabel("step")
    ax.set_ylabel(panel.get("ylabel", series.replace("_", " ")))
    if panel.get("logy"):
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _band(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    for variant in _panel_variants(panel, spec, results):
        runs = results.runs(variant)
        kept, lost = _split(runs)
        label = spec.variants[variant].label + (f" ({len(lost)}/{len(runs)} diverged: not shown)" if lost else "")
        if not kept:
            ax.plot([], [], color=_color(spec, variant), label=label)
            continue
        steps, lower = _seed_stack(kept, panel["lower"])
        _, upper = _seed_stack(kept, panel["upper"])
        ax.fill_between(steps, _stats(lower)[0], _stats(upper)[0], color=_color(spec, variant), alpha=0.35, lw=0,
                        label=label)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(panel.get("ylabel", "loss"))
    if panel.get("logy"):
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _percentiles(axes: list[Axes], panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    unit = int(panel.get("unit", 0))
    for ax, variant in zip(axes, _panel_variants(panel, spec, results), strict=False):
        records = [r for r in results.runs(variant)[0].get("percentiles") or [] if r["unit"] == unit]
        keys = sorted((k for k in (records[0] if records else {}) if k.startswith("p")), key=lambda k: float(k[1:]))
        for key, style in zip(keys, ("--", "-", "--", ":", ":"), strict=False):
            ax.plot([r["step"] for r in records], [r[key] for r in records], style, color="k", lw=1.0,
                    label=f"{float(key[1:]):g}th")  # fmt: skip
        ax.set_title(f"{spec.variants[variant].label}: unit {unit}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.get("ylabel", "sigmoid input"))
        ax.legend(fontsize=6, ncols=3, loc="upper center", frameon=False)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.25 * (high - low))  # room for the legend


def _values(metric: Any, runs: list[dict[str, Any]], results: Results, scale: float) -> list[tuple[float, bool]]:
    return [(run_metric(metric, run, results)[0] * scale, diverged(run)) for run in runs]


def _bars(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    metrics = panel.get("metrics") or [panel["metric"]]
    names = [metric_name(m)[0] for m in metrics]
    variants = _panel_variants(panel, spec, results)
    scale = 100.0 if all(n in ACCURACIES or n == "recalibration_gain" for n in names) else 1.0
    width = 0.8 / len(metrics)
    shown: list[float] = []
    for j, metric in enumerate(metrics):
        for i, variant in enumerate(variants):
            values = _values(metric, results.runs(variant), results, scale)
            finite = [v for v, _ in values if math.isfinite(v)]
            mean = statistics.fmean(finite) if finite else 0.0
            std = statistics.stdev(finite) if len(finite) > 1 else 0.0
            x = i + (j - (len(metrics) - 1) / 2) * width
            color = COLORS[j % len(COLORS)] if len(metrics) > 1 else _color(spec, variant)
            label = metric_label(metric) if i == 0 and len(metrics) > 1 else None
            ax.bar(x, mean if finite else 0.0, width=width * 0.9, yerr=std, color=color, alpha=0.7, capsize=3,
                   label=label)  # fmt: skip
            ax.plot([x for v, d in values if math.isfinite(v) and not d], [v for v, d in values
                    if math.isfinite(v) and not d], "k.", ms=3)  # fmt: skip
            ax.plot([x for v, d in values if math.isfinite(v) and d], [v for v, d in values
                    if math.isfinite(v) and d], "x", color="tab:red", ms=6, mew=1.5)  # fmt: skip
            lost = sum(d for _, d in values)
            if lost:
                ax.annotate(f"{lost}/{len(values)} diverged", (x, mean), fontsize=6, color="tab:red",
                            ha="center", va="bottom", rotation=90)  # fmt: skip
            shown += finite
    ax.set_xticks(range(len(variants)), [spec.variants[v].label for v in variants], rotation=25, ha="right",
                  fontsize=7)  # fmt: skip
    default = metric_label(metrics[0]) if len(metrics) == 1 else "value"
    ax.set_ylabel(panel.get("ylabel", default + (" (%)" if scale == 100 else "")))
    if len(metrics) > 1:
        ax.legend(fontsize=7)
    if panel.get("ylim"):
        ax.set_ylim(*panel["ylim"])
    elif scale == 100 and shown and min(shown) > 20:  # accuracies: zoom in, the axis says where it starts
        low, high = min(shown), max(shown)
        ax.set_ylim(
            5 * math.floor((low - max(2.0, 0.5 * (high - low))) / 5), min(100.0, high + 0.15 * (high - low) + 1)
        )


def _sweep(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    metric = panel["metric"]
    name, _ = metric_name(metric)
    scale = 100.0 if name in ACCURACIES else 1.0
    for i, (label, variants) in enumerate(panel["groups"].items()):
        xs, means, stds, color = [], [], [], COLORS[i % len(COLORS)]
        for variant in (v for v in variants if v in results.variants()):
            values = _values(metric, results.runs(variant), results, scale)
            finite = [v for v, _ in values if math.isfinite(v)]
            x = spec.variants[variant].x
            xs.append(x)
            means.append(statistics.fmean(finite) if finite else math.nan)
            stds.append(statistics.stdev(finite) if len(finite) > 1 else 0.0)
            lost = [v for v, d in values if d and math.isfinite(v)]
            ax.plot([x] * len(lost), lost, "x", color="tab:red", ms=6, mew=1.5)
            if sum(d for _, d in values):
                ax.annotate(f"{sum(d for _, d in values)}/{len(values)} diverged", (x, means[-1]), fontsize=6,
                            color="tab:red", ha="left", va="bottom")  # fmt: skip
        ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, color=color, label=label)
    if panel.get("logx"):
        ax.set_xscale("log")
    ax.set_xlabel(panel.get("xlabel", "x"))
    ax.set_ylabel(panel.get("ylabel", metric_label(metric) + (" (%)" if scale == 100 else "")))
    ax.legend(fontsize=7)


_SINGLE: dict[str, Callable[[Axes, dict[str, Any], ExperimentSpec, Results], None]] = {
    "curve": _curve,
    "band": _band,
    "bars": _bars,
    "sweep": _sweep,
}


def render_figure(spec: ExperimentSpec, results: Results, path: Path) -> Path | None:
    """Draw the spec's panels into one PNG (small: 90 dpi); None when the spec has no panels."""
    panels = spec.figure
    if not panels:
        return None
    for panel in panels:
        if panel.get("kind") not in PANEL_KINDS:
            raise ValueError(f"{spec.name}: unknown figure kind {panel.get('kind')!r}; valid: {', '.join(PANEL_KINDS)}")
    counts = [len(_panel_variants(p, spec, results)) if p["kind"] == "percentiles" else 1 for p in panels]
    total = sum(counts)
    columns = min(total, 4 if total != 5 else 3)
    rows = math.ceil(total / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.5 * columns, 2.8 * rows), squeeze=False)
    axes = list(grid.flat)
    position = 0
    for panel, count in zip(panels, counts, strict=True):
        own = axes[position : position + count]
        position += count
        if panel["kind"] == "percentiles":
            _percentiles(own, panel, spec, results)
        else:
            _SINGLE[panel["kind"]](own[0], panel, spec, results)
            if panel.get("title"):
                own[0].set_title(panel["title"], fontsize=9)
        for ax in own:
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    for ax in axes[position:]:
        ax.axis("off")
    figure.suptitle(f"{', '.join(spec.claims)}: {spec.title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90, pil_kwargs={"optimize": True})
    plt.close(figure)
    return path
