"""``bnzoo experiment report``: the Markdown report and one PNG figure per experiment, from results files only.

Reads ``<results_dir>/<experiment>.json`` (written by :mod:`bnzoo_lab.runner`), judges every finding with the spec
*stored with the results* by the rules of :mod:`bnzoo_lab.metrics`, checks each result's provenance against the
code and spec of now (:mod:`bnzoo_lab.provenance`: a result made by other code or another setup is marked STALE,
or refused with ``strict``), and writes ``<out>/claims.md`` and ``<out>/<experiment>.png``
(:mod:`bnzoo_lab.figures`). With ``readme``, the summary between ``<!-- claims:begin -->`` and
``<!-- claims:end -->`` in that file is rewritten from the same numbers. Nothing is trained: the report can be
regenerated at any time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bnzoo.io import atomic_write_bytes

from .figures import render_figure
from .formatting import describe_side, format_stat, format_test, metric_label, table
from .metrics import (
    ALPHA,
    MIN_SEEDS,
    VERDICTS,
    Judgement,
    Results,
    SideValues,
    judge,
    metric_name,
    run_metric,
    side_values,
)
from .provenance import source_hash, staleness
from .spec import BINARY_METRICS, CONFIG_ROOT, ExperimentSpec, Finding, Variant, load_spec

__all__ = ["Loaded", "load_results", "readme_summary", "write_readme", "write_report"]

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


# ----------------------------------------------------------------------------------------------------------
# Loading


def spec_from_summary(data: dict[str, Any]) -> ExperimentSpec:
    """Rebuild a spec from the copy stored in a results file."""
    values = {f.name: data[f.name] for f in fields(ExperimentSpec) if f.name in data}
    values["folder"] = Path(values["folder"])
    values["variants"] = {k: Variant(**v) for k, v in values["variants"].items()}
    values["findings"] = [Finding(**f) for f in values["findings"]]
    return ExperimentSpec(**values)


@dataclass(frozen=True)
class Loaded:
    """One results file: the spec stored with it (what it is judged by), its results, why it is stale (empty:
    current) and notes (e.g. the spec's findings changed since the run)."""

    spec: ExperimentSpec
    results: Results
    stale: list[str]
    notes: list[str]


def _current_spec(name: str, root: Path) -> ExperimentSpec | None:
    if not (root / name / "experiment.yaml").is_file():
        return None
    try:
        return load_spec(name, root)
    except ValueError:  # a spec that no longer loads cannot vouch for the result
        return None


def load_results(results_dir: Path, config_root: Path | None = None, strict: bool = False) -> list[Loaded]:
    """Every experiment's results under ``results_dir`` in claim order, with their provenance checked; ``strict``
    raises a ValueError naming every stale result instead of marking them."""
    root, code, loaded = config_root or CONFIG_ROOT, source_hash(), []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if "experiment" not in data:
            continue  # e.g. suite.json
        current = _current_spec(data["experiment"], root)
        stored = spec_from_summary(data["spec"]) if data.get("spec") else current
        if stored is None:
            raise ValueError(f"{path}: no spec stored with the results and no experiment {data['experiment']!r}")
        provenance = data.get("provenance")
        notes = []
        if provenance and current is not None and stored.findings != current.findings:
            notes.append("the experiment's findings changed since this run; judged with the findings stored "
                         "with the results")  # fmt: skip
        reasons = staleness(provenance, current, code)
        asked = (current.quick_seeds if data.get("quick") else current.seeds) if current is not None else None
        if asked is not None and list(data["seeds"]) != asked:
            reasons.append(f"run with seeds {data['seeds']}, the experiment asks {asked}")
        loaded.append(Loaded(stored, Results(data), reasons, notes))
    stale = [f"{item.spec.name}: {'; '.join(item.stale)}" for item in loaded if item.stale]
    if strict and stale:
        raise ValueError("stale results (rerun them with `bnzoo experiment run`):\n  " + "\n  ".join(stale))
    order = {c: i for i, c in enumerate(f"C{n}" for n in range(1, 100))}
    return sorted(loaded, key=lambda item: (order.get(item.spec.claims[0], 999), item.spec.name))


# ----------------------------------------------------------------------------------------------------------
# The Markdown report


RULES_TEXT = f"""\
Every number is a mean over seeds (each seed changes the initialization, the data order and, where the data is a
subset, which images); "±" is the sample standard deviation over seeds. A finding compares a metric of two sides
(a variant, a metric reduced over a group of variants seed by seed, or a constant) with an explicit rule and a
stated test at level {ALPHA:g}; the table gives the test, its p-value and the 90% confidence interval of the
difference (Welch's; each end is a one-sided 95% bound):

- **greater**: *reproduced* if Welch's one-sided t-test finds mean(a) > mean(b) (beyond `min_margin` where the
  finding sets one): p <= {ALPHA:g}, the interval's lower end above 0; *opposite* if it finds mean(a) < mean(b);
  otherwise *not reproduced (within noise)*. For a 0/1 metric (diverged, failed) the test is the exact
  permutation test of the rates (Fisher's exact test), with no interval.
- **less**: the same with the direction exchanged.
- **close**: equivalence within the finding's fixed tolerance by two one-sided tests (TOST, never widened by the
  seed spread): *reproduced* if the interval lies inside +-tolerance; *not reproduced* if the difference is
  significantly outside it; otherwise *not reproduced (within noise)*.
- *too few seeds* when a side has fewer than {MIN_SEEDS} seeds (quick mode); *no verdict (non-finite values)* when a
  value is not finite.

Steps to a target accuracy count the first validation at or above the target; a run that never reaches it
counts as its last step plus one validation interval and is marked ">" (a lower bound: such a comparison
understates the difference). Each result is judged with the spec stored with it; a result made by other code
or with another setup of its experiment than today's is marked **STALE**. The rules are defined in
`bnzoo_lab/metrics.py`, the tests in `bnzoo_lab/stats.py`, the findings in
`configs/experiments/<name>/experiment.yaml`."""


def _variant_table(spec: ExperimentSpec, results: Results) -> list[str]:
    metrics: list[Any] = []
    for metric in ["test_acc", *(f.metric for f in spec.findings)]:
        if metric not in metrics:
            metrics.append(metric)
    names = [metric_name(m) for m in metrics]
    header = ["variant", "seeds", "diverged"] + [metric_label(m) for m in metrics]
    rows = []
    for variant in (v for v in spec.variants if v in results.variants()):
        runs = results.runs(variant)
        lost = sum(r.get("diverged_at") is not None for r in runs)
        row = [spec.variants[variant].label, str(len(runs)), f"{lost}/{len(runs)}" if lost else "-"]
        for metric, (name, _) in zip(metrics, names, strict=True):
            pairs = [run_metric(metric, run, results) for run in runs]
            values = [v for v, _ in pairs]
            if all(math.isnan(v) for v in values):
                row.append("")
                continue
            row.append(format_stat(name, SideValues("", values, [c for _, c in pairs])))
        rows.append(row)
    return table(rows, header)


def judgements(spec: ExperimentSpec, results: Results) -> list[tuple[Finding, Judgement, str]]:
    """Every finding of ``spec`` judged on ``results``: ``(finding, judgement, metric name)``."""
    labels = {name: v.label for name, v in spec.variants.items()}
    out = []
    for finding in spec.findings:
        name, _ = metric_name(finding.metric)
        a = side_values(finding.a, finding.metric, results, labels)
        b = side_values(finding.b, finding.metric, results, labels)
        judged = judge(finding.rule, a, b, finding.min_margin, finding.tolerance, binary=name in BINARY_METRICS)
        out.append((finding, judged, name))
    return out


def _ours(judgement: Judgement, name: str) -> str:
    return f"{describe_side(name, judgement.a)} vs {describe_side(name, judgement.b)}"


def _verdict(judgement: Judgement, item: Loaded) -> str:
    return f"**{judgement.verdict}**" + (" (STALE)" if item.stale else "")


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


def _counts(rows: list[str]) -> str:
    counts = Counter(rows)
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])


def readme_summary(loaded: list[Loaded], report: str = "reports/claims.md") -> list[str]:
    """The README's claims summary, from the report's numbers: the verdicts counted over all findings, and per
    claim (one row per claim and experiment) with whether its results are current."""
    rows, verdicts, stale = [], [], sum(bool(item.stale) for item in loaded)
    for item in loaded:
        judged = judgements(item.spec, item.results)
        verdicts += [j.verdict for _, j, _ in judged]
        for claim in dict.fromkeys(f.claim for f, _, _ in judged):
            mine = [j.verdict for f, j, _ in judged if f.claim == claim]
            status = "**STALE**" if item.stale else "current"
            rows.append([claim, item.spec.title, f"{len(mine)}: {_counts(mine)}",
                         f"[{item.spec.name}]({report}#{item.spec.name})", status])  # fmt: skip
    runs = sum(len(item.results.data["runs"]) for item in loaded)
    head = (f"Generated by `bnzoo experiment report --readme README.md` from the results of [{report}]({report}) "
            f"(where each finding has its numbers, test, p-value and interval): {len(loaded)} experiments, {runs} "
            f"training runs, {len(verdicts)} findings: {_counts(verdicts)}.")  # fmt: skip
    if stale:
        head += f" **The results of {stale} of the {len(loaded)} experiments are STALE** (see the report)."
    return [head, "", *table(rows, ["claim", "experiment", "findings", "details", "results"])]


def write_readme(readme: Path, summary: list[str]) -> None:
    """Replace what lies between the ``<!-- claims:begin -->`` and ``<!-- claims:end -->`` lines of ``readme``."""
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme}: needs one {BEGIN} line followed by one {END} line around the claims summary")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    atomic_write_bytes(readme, (head + BEGIN + "\n" + "\n".join(summary) + "\n" + END + tail).encode())


def write_report(results_dir: Path, out: Path, config_root: Path | None = None, *, strict: bool = False,
                 readme: Path | None = None) -> Path:  # fmt: skip
    """Write ``<out>/claims.md`` and one ``<out>/<experiment>.png`` per results file (and the README's summary
    with ``readme``); returns the Markdown path. ``strict``: refuse stale results (a ValueError)."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_results(results_dir, config_root, strict)
    lines = [
        "# The claims lab: what normalization is claimed to do, reproduced at small scale",
        "",
        f"Generated by `bnzoo experiment report` from `{results_dir}/*.json` ({len(loaded)} experiments, "
        f"{sum(len(item.results.data['runs']) for item in loaded)} training runs). The claims, their sources and "
        "the source numbers are those of the project's claims list; every run is a `bnzoo fit` config under "
        "`configs/experiments/`, trained on real data on a CPU. A claim that does not reproduce at this scale is "
        "reported as such.",
        "",
        _suite_line(results_dir, [(item.spec, item.results) for item in loaded]),
        "",
    ]
    if any(item.results.data.get("quick") for item in loaded):
        lines += ["**These are quick-mode results (a few steps per run): the numbers mean nothing.**", ""]
    stale = [f"- `{item.spec.name}`: {'; '.join(item.stale)}" for item in loaded if item.stale]
    if stale:
        lines += ["**STALE results** -- made by other code or another setup than today's (their verdicts are "
                  "marked; rerun them):", "", *stale, ""]  # fmt: skip
    summary_rows, sections, verdicts = [], [], []
    for item in loaded:
        spec, results = item.spec, item.results
        judged = judgements(spec, results)
        figure = render_figure(spec, results, out / f"{spec.name}.png")
        for finding, judgement, name in judged:
            link = f"[{spec.name}](#{spec.name})"  # GitHub's heading anchors keep underscores
            row = [finding.claim, finding.statement, finding.source or "-", _ours(judgement, name)]
            summary_rows.append([*row, format_test(name, judgement), _verdict(judgement, item), link])
            verdicts.append(judgement.verdict)
        section = [f"## {spec.name}", "", f"**{', '.join(spec.claims)}: {spec.title}.** Source: {spec.source}.", ""]
        section += [f"Setup: {spec.setup}", ""] if spec.setup else []
        section += [f"**STALE**: {'; '.join(item.stale)}.", ""] if item.stale else []
        section += [*(f"Note: {n}." for n in item.notes), ""] if item.notes else []
        if figure is not None:
            section += [f"![{spec.name}]({figure.name})", ""]
        section += _variant_table(spec, results) + [""]
        for finding, judgement, name in judged:
            section += [
                f"- {finding.claim}, *{finding.statement}* (rule `{finding.rule}` on `{json.dumps(finding.metric)}`"
                f"{f', tolerance {finding.tolerance:g}' if finding.rule == 'close' else ''}): {_ours(judgement, name)}"
                f"; {format_test(name, judgement)} -> {_verdict(judgement, item)}."
            ]
        section += ["", f"Note: {spec.notes}"] if spec.notes else []
        load = results.data.get("machine", {}).get("load_avg", [math.nan])[0]
        prov = results.data.get("provenance") or {}
        dirty = " + uncommitted changes" if prov.get("dirty") else ""
        made = f"commit {prov['commit'][:10]}{dirty}, " if prov.get("commit") else ""
        section += [
            "",
            f"{len(results.data['runs'])} runs, {results.data['wall_s'] / 60:.1f} min (started "
            f"{results.data.get('started', '?')}, 1-minute load average {load:.1f} at the start; {made}"
            f"{'no provenance' if not prov else 'sources ' + prov['source_hash'][:12]}); results: "
            f"`{results_dir.name}/{spec.name}.json`.",
            "",
        ]
        sections += section
    lines += ["## Summary", "", f"{len(verdicts)} findings: {_counts(verdicts)}.", ""]
    lines += table(summary_rows, ["claim", "finding", "source number", "our number", "test", "verdict", "experiment"])
    lines += ["", "## How verdicts are computed", "", RULES_TEXT, ""] + sections
    path = out / "claims.md"
    atomic_write_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())
    if readme is not None:
        write_readme(readme, readme_summary(loaded, path.as_posix()))
    return path
