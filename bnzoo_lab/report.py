"""``bnzoo experiment report``: the Markdown report and one PNG figure per experiment, from results files only.

Reads ``<results_dir>/<experiment>.json`` (written by :mod:`bnzoo_lab.runner`) and the experiment's spec
(the current ``experiment.yaml`` when it exists, else the copy stored with the results), judges every finding with
the rules of :mod:`bnzoo_lab.metrics`, and writes ``<out>/claims.md`` and ``<out>/<experiment>.png``.
Nothing is trained: the report can be regenerated at any time, e.g. after changing a finding's rule.

Figure panels (a spec's ``figure:`` list), each a mapping with ``kind`` and an optional ``title``:

* ``curve``: ``series`` (``val_acc``, ``val_loss``, ``train_loss`` or ``landscape.<key>``) against the step, the mean
  over seeds with their min-max band; options ``variants``, ``logy``, ``smooth`` (moving-average window).
* ``band``: the seed-mean of ``lower`` and ``upper`` series filled between (Santurkar et al. 2018, Fig. 4).
* ``percentiles``: one axis per variant (``variants``) with the percentiles of ActivationPercentiles for the first
  seed and ``unit`` (Ioffe & Szegedy 2015, Fig. 1(b, c)).
* ``bars``: ``metric`` per variant, mean with the seeds' standard deviation and each seed as a dot.
* ``sweep``: ``metric`` against each variant's ``x``, one line per entry of ``groups`` (label -> variants);
  ``logx`` for a log axis.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from .metrics import Judgement, Results, SideValues, judge, metric_name, run_metric, side_values
from .spec import CONFIG_ROOT, ExperimentSpec, Finding, Variant, load_spec

__all__ = ["load_results", "render_figure", "write_report"]

ACCURACIES = ("test_acc", "recalibrated_test_acc", "final_val_acc", "max_val_acc", "mean_val_acc")
PANEL_KINDS = ("curve", "band", "percentiles", "bars", "sweep")
COLORS = plt.get_cmap("tab10").colors


# ----------------------------------------------------------------------------------------------------------
# Loading


def spec_from_summary(data: dict[str, Any]) -> ExperimentSpec:
    """Rebuild a spec from the copy stored in a results file."""
    values = {f.name: data[f.name] for f in fields(ExperimentSpec) if f.name in data}
    values["folder"] = Path(values["folder"])
    values["variants"] = {k: Variant(**v) for k, v in values["variants"].items()}
    values["findings"] = [Finding(**f) for f in values["findings"]]
    return ExperimentSpec(**values)


def load_results(results_dir: Path, config_root: Path | None = None) -> list[tuple[ExperimentSpec, Results]]:
    """Every experiment's (spec, results) under ``results_dir``, in claim order."""
    pairs = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if "experiment" not in data:
            continue  # e.g. suite.json
        root = config_root or CONFIG_ROOT
        if (root / data["experiment"] / "experiment.yaml").is_file():
            spec = load_spec(data["experiment"], root)
        else:
            spec = spec_from_summary(data["spec"])
        pairs.append((spec, Results(data)))
    order = {c: i for i, c in enumerate(f"C{n}" for n in range(1, 100))}
    return sorted(pairs, key=lambda p: (order.get(p[0].claims[0], 999), p[0].name))


# ----------------------------------------------------------------------------------------------------------
# Numbers as text


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
    n = len(side.values)
    if metric in ("diverged", "failed"):
        what = "diverged" if metric == "diverged" else "failed (diverged or near chance)"
        return f"{side.label}: {format_stat(metric, side)} {what}"
    return f"{side.label}: {format_stat(metric, side)}" + (f" ({n} seeds)" if n > 1 else " (1 seed)")


# ----------------------------------------------------------------------------------------------------------
# Figures


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
    """The series of every seed on the first seed's steps (runs that stopped early are cut at their end)."""
    curves = [_series(run, series) for run in runs]
    steps = max((c[0] for c in curves), key=len)
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


def _curve(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    series = panel["series"]
    for variant in _panel_variants(panel, spec, results):
        steps, stacked = _seed_stack(results.runs(variant), series, int(panel.get("smooth", 1)))
        mean, low, high = _stats(stacked)
        color = _color(spec, variant)
        marker = "o" if len(steps) <= 12 else None
        ax.plot(steps, mean, color=color, label=spec.variants[variant].label, lw=1.4, marker=marker, ms=3)
        if len(stacked) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.get("ylabel", series.replace("_", " ")))
    if panel.get("logy"):
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _band(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    for variant in _panel_variants(panel, spec, results):
        runs = results.runs(variant)
        steps, lower = _seed_stack(runs, panel["lower"])
        _, upper = _seed_stack(runs, panel["upper"])
        color = _color(spec, variant)
        ax.fill_between(steps, _stats(lower)[0], _stats(upper)[0], color=color, alpha=0.35, lw=0,
                        label=spec.variants[variant].label)  # fmt: skip
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


def _bars(ax: Axes, panel: dict[str, Any], spec: ExperimentSpec, results: Results) -> None:
    metrics = panel.get("metrics") or [panel["metric"]]
    names = [metric_name(m)[0] for m in metrics]
    variants = _panel_variants(panel, spec, results)
    scale = 100.0 if all(n in ACCURACIES or n == "recalibration_gain" for n in names) else 1.0
    width = 0.8 / len(metrics)
    shown: list[float] = []
    for j, metric in enumerate(metrics):
        for i, variant in enumerate(variants):
            values = [run_metric(metric, run, results)[0] * scale for run in results.runs(variant)]
            finite = [v for v in values if math.isfinite(v)]
            mean = statistics.fmean(finite) if finite else 0.0
            std = statistics.stdev(finite) if len(finite) > 1 else 0.0
            x = i + (j - (len(metrics) - 1) / 2) * width
            color = COLORS[j % len(COLORS)] if len(metrics) > 1 else _color(spec, variant)
            label = metric_label(metric) if i == 0 and len(metrics) > 1 else None
            ax.bar(x, mean, width=width * 0.9, yerr=std, color=color, alpha=0.7, capsize=3, label=label)
            ax.plot([x] * len(finite), finite, "k.", ms=3)
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
        xs, means, stds = [], [], []
        for variant in (v for v in variants if v in results.variants()):
            values = [run_metric(metric, run, results)[0] * scale for run in results.runs(variant)]
            xs.append(spec.variants[variant].x)
            means.append(statistics.fmean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, color=COLORS[i % len(COLORS)], label=label)
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


# ----------------------------------------------------------------------------------------------------------
# The Markdown report


RULES_TEXT = """\
Every number is a mean over seeds (each seed changes the initialization, the data order and, where the data is a
subset, which images); "±" is the sample standard deviation over seeds. A finding compares a metric of two sides
(a variant, or a metric reduced over a group of variants seed by seed, e.g. the range of accuracy across a sweep)
with an explicit rule, where `margin = max(larger of the two sides' standard deviations, the finding's
min_margin)`:

- **greater**: *reproduced* if mean(a) - mean(b) > margin; *opposite* if mean(b) - mean(a) > margin; otherwise
  *not reproduced (within noise)*.
- **less**: the same with a and b exchanged.
- **close**: *reproduced* if |mean(a) - mean(b)| <= max(tolerance, margin), otherwise *not reproduced*.

Steps to a target accuracy count the first validation at or above the target; a run that never reaches it
counts as its last step plus one validation interval and is marked ">" (the true number is larger, so such a
comparison understates the difference). The rules and every metric are defined in
`bnzoo_lab/metrics.py`; the findings of each experiment in `configs/experiments/<name>/experiment.yaml`."""


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def _variant_table(spec: ExperimentSpec, results: Results) -> list[str]:
    metrics: list[Any] = []
    for metric in ["test_acc", *(f.metric for f in spec.findings)]:
        if metric not in metrics:
            metrics.append(metric)
    names = [metric_name(m) for m in metrics]
    header = ["variant", "seeds"] + [metric_label(m) for m in metrics]
    rows = []
    for variant in (v for v in spec.variants if v in results.variants()):
        runs = results.runs(variant)
        row = [spec.variants[variant].label, str(len(runs))]
        for metric, (name, _) in zip(metrics, names, strict=True):
            pairs = [run_metric(metric, run, results) for run in runs]
            values = [v for v, _ in pairs]
            if all(math.isnan(v) for v in values):
                row.append("")
                continue
            row.append(format_stat(name, SideValues("", values, [c for _, c in pairs])))
        rows.append(row)
    return _table(rows, header)


def _judgements(spec: ExperimentSpec, results: Results) -> list[tuple[Finding, Judgement, str]]:
    labels = {name: v.label for name, v in spec.variants.items()}
    out = []
    for finding in spec.findings:
        name, _ = metric_name(finding.metric)
        a = side_values(finding.a, finding.metric, results, labels)
        b = side_values(finding.b, finding.metric, results, labels)
        out.append((finding, judge(finding.rule, a, b, finding.min_margin, finding.tolerance), name))
    return out


def _ours(judgement: Any, name: str) -> str:
    return f"{describe_side(name, judgement.a)} vs {describe_side(name, judgement.b)}"


def _suite_line(results_dir: Path, pairs: list[tuple[Any, Any]]) -> str:
    """Time and machine: the experiments' own wall times (summed), and the latest ``run`` invocation's load."""
    total_min = sum(r.data["wall_s"] for _, r in pairs) / 60
    starts = sorted(r.data["started"] for _, r in pairs if r.data.get("started"))
    span = f" between {starts[0]} and {starts[-1]}" if starts else ""
    head = f"The {len(pairs)} experiments took **{total_min:.1f} min** of wall time in all (started{span})."
    path = results_dir / "suite.json"
    if not path.is_file():
        return head + " They were run one by one; no suite record."
    suite = json.loads(path.read_text())
    machine, load = suite["machine"], suite["load_avg_1min"]
    kind = "quick mode, " if suite.get("quick") else ""
    failed = f" Failed: {', '.join(suite['failed'])}." if suite.get("failed") else ""
    which = "the whole suite" if len(suite["experiments"]) == len(pairs) else ", ".join(suite["experiments"])
    return (
        f"{head} The latest `bnzoo experiment run` ({kind}{which}) took {suite['wall_s'] / 60:.1f} min "
        f"(finished {suite['finished']}) on {machine['processor']}, {machine['cpus']} CPU cores, torch "
        f"{machine['torch']}, {suite['jobs']} experiment(s) at a time with {suite['threads'] or 'default'} "
        f"thread(s) each. The machine was shared with other work: 1-minute load average {load['mean']:.1f} on "
        f"average, {load['max']:.1f} at most ({load['samples']} samples; {machine['cpus']} would be a fully "
        f"busy machine).{failed}"
    )


def write_report(results_dir: Path, out: Path, config_root: Path | None = None) -> Path:
    """Write ``<out>/claims.md`` and one ``<out>/<experiment>.png`` per results file; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = load_results(results_dir, config_root)
    lines = [
        "# The claims lab: what normalization is claimed to do, reproduced at small scale",
        "",
        f"Generated by `bnzoo experiment report` from `{results_dir}/*.json` ({len(pairs)} experiments, "
        f"{sum(len(r.data['runs']) for _, r in pairs)} training runs). The claims, their sources and the source "
        "numbers are those of the project's claims list; every run is a `bnzoo fit` config under "
        "`configs/experiments/`, trained on real data (Fashion-MNIST) on a CPU. A claim that does not reproduce "
        "at this scale is reported as such.",
        "",
        _suite_line(results_dir, pairs),
        "",
    ]
    if any(r.data.get("quick") for _, r in pairs):
        lines += ["**These are quick-mode results (a few steps per run): the numbers mean nothing.**", ""]
    summary_rows, sections = [], []
    for spec, results in pairs:
        judged = _judgements(spec, results)
        figure = render_figure(spec, results, out / f"{spec.name}.png")
        for finding, judgement, name in judged:
            link = f"[{spec.name}](#{spec.name})"  # GitHub's heading anchors keep underscores
            row = [finding.claim, finding.statement, finding.source or "-", _ours(judgement, name)]
            summary_rows.append([*row, f"**{judgement.verdict}**", link])
        section = [f"## {spec.name}", "", f"**{', '.join(spec.claims)}: {spec.title}.** Source: {spec.source}.", ""]
        section += [f"Setup: {spec.setup}", ""] if spec.setup else []
        if figure is not None:
            section += [f"![{spec.name}]({figure.name})", ""]
        section += _variant_table(spec, results) + [""]
        for finding, judgement, name in judged:
            section += [
                f"- {finding.claim}, *{finding.statement}* (rule `{finding.rule}` on `{json.dumps(finding.metric)}`, "
                f"margin {format_value(name, judgement.margin).lstrip('>+')}): {_ours(judgement, name)} -> "
                f"**{judgement.verdict}**."
            ]
        section += ["", f"Note: {spec.notes}"] if spec.notes else []
        load = results.data.get("machine", {}).get("load_avg", [math.nan])[0]
        section += [
            "",
            f"{len(results.data['runs'])} runs, {results.data['wall_s'] / 60:.1f} min (started "
            f"{results.data.get('started', '?')}, 1-minute load average {load:.1f} at the start); results: "
            f"`{results_dir.name}/{spec.name}.json`.",
            "",
        ]
        sections += section
    lines += ["## Summary", ""]
    lines += _table(summary_rows, ["claim", "finding", "source number", "our number", "verdict", "experiment"])
    lines += ["", "## How verdicts are computed", "", RULES_TEXT, ""] + sections
    path = out / "claims.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
