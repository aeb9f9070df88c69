"""The claims report from synthetic results: each verdict with its test and interval, provenance (a result made by
other code, another setup or with no record is STALE; ``--strict`` refuses it; changed findings are judged with the
stored ones), the README's generated summary, and diverged seeds drawn as such."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from bnzoo_lab import main, provenance
from bnzoo_lab.figures import _curve
from bnzoo_lab.metrics import Results
from bnzoo_lab.report import BEGIN, END, load_results, write_readme, write_report
from bnzoo_lab.spec import load_spec

SEEDS = [0, 1, 2, 3, 4]
ACC = {"a": [0.90, 0.91, 0.92, 0.905, 0.915], "b": [0.85, 0.86, 0.84, 0.855, 0.845]}
FINDINGS = [
    {"claim": "C99", "statement": "a beats b", "metric": "test_acc", "rule": "greater", "a": "a", "b": "b"},
    {"claim": "C99", "statement": "a matches b", "metric": "test_acc", "rule": "close", "a": "a", "b": "b",
     "tolerance": 0.01},
]  # fmt: skip


def make_experiment(root: Path, findings: list[dict[str, Any]] = FINDINGS, lr: float = 0.1) -> None:
    folder = root / "c99_test"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"lr": lr}}}))
    spec = {"claim": "C99", "title": "a test", "config": "base.yaml", "seeds": SEEDS, "expected_minutes": 1,
            "variants": {"a": {"label": "A"}, "b": {"label": "B"}}, "findings": findings,
            "figure": [{"kind": "curve", "series": "val_acc"}]}  # fmt: skip
    (folder / "experiment.yaml").write_text(yaml.safe_dump(spec))


def run(variant: str, seed: int, acc: float, diverged: bool = False) -> dict[str, Any]:
    val = [[10, acc - 0.1, 1.0], [20, acc - 0.05, 0.8], [30, acc, 0.6]]
    return {"variant": variant, "seed": seed, "steps": 30, "test_acc": acc, "val": val[:1] if diverged else val,
            "train_loss": [[0, 2.0], [10, math.nan if diverged else 1.0]], "diverged_at": 10 if diverged else None,
            "wall_s": 1.0}  # fmt: skip


def write_results(root: Path, results_dir: Path, **change: Any) -> Path:
    spec = load_spec("c99_test", root)
    runs = [run(v, s, ACC[v][i], diverged=(v, s) == ("b", 4)) for v in ("a", "b") for i, s in enumerate(SEEDS)]
    data = {"experiment": "c99_test", "spec": spec.summary(), "quick": False, "seeds": SEEDS, "wall_s": 60.0,
            "started": "2026-01-01T00:00:00+00:00", "machine": {"load_avg": [1.0]},
            "provenance": provenance.collect(spec), "runs": runs}  # fmt: skip
    data |= change
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "c99_test.json"
    path.write_text(json.dumps(data))
    return path


def summary_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("| C99")]


def test_each_verdict_carries_its_test_p_value_and_interval(tmp_path: Path) -> None:
    make_experiment(tmp_path / "configs")
    write_results(tmp_path / "configs", tmp_path / "results")
    report = write_report(tmp_path / "results", tmp_path / "out", tmp_path / "configs").read_text()
    assert "STALE results" not in report and "(STALE)" not in report
    greater, close = summary_rows(report)
    p = scipy_stats.ttest_ind(ACC["a"], ACC["b"], equal_var=False, alternative="greater").pvalue
    assert "Welch t, one-sided, " + ("p < 0.001" if p < 0.001 else f"p = {p:.3f}") in greater
    diff = np.mean(ACC["a"]) - np.mean(ACC["b"])
    assert f"diff {100 * diff:+.1f} pts, 90% CI [" in greater and "**reproduced**" in greater
    assert "TOST (Welch) within +-1.0 pts" in close and "**not reproduced**" in close  # 5.5 pts apart
    assert "2 findings: 1 reproduced, 1 not reproduced." in report
    assert "| B | 5 | 1/5 |" in report  # the variant table counts the diverged seed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("code", "made by other code (commit "),
        ("setup", "made with another setup of the experiment"),
        ("none", "no provenance"),
        ("seeds", "run with seeds [0, 1, 2], the experiment asks [0, 1, 2, 3, 4]"),
    ],
)
def test_results_from_other_code_or_setup_are_stale_and_refused_when_strict(
    tmp_path: Path, change: str, reason: str
) -> None:
    root, results = tmp_path / "configs", tmp_path / "results"
    make_experiment(root)
    path = write_results(root, results)
    data = json.loads(path.read_text())
    if change == "code":
        data["provenance"]["source_hash"] = "0" * 64
    elif change == "none":
        del data["provenance"]
    elif change == "seeds":  # `bnzoo experiment run --seeds 0 1 2`
        data["seeds"], data["runs"] = [0, 1, 2], [r for r in data["runs"] if r["seed"] < 3]
    path.write_text(json.dumps(data))
    if change == "setup":
        make_experiment(root, lr=0.2)  # the base config changed since the run
    report = write_report(results, tmp_path / "out", root).read_text()
    assert f"`c99_test`: {reason}" in report
    assert all("(STALE)" in row for row in summary_rows(report))
    with pytest.raises(ValueError, match=re.escape(f"c99_test: {reason}")):
        load_results(results, root, strict=True)


def test_changed_findings_are_judged_with_the_stored_ones(tmp_path: Path) -> None:
    root, results = tmp_path / "configs", tmp_path / "results"
    make_experiment(root)
    write_results(root, results)
    flipped = [dict(FINDINGS[0], rule="less", statement="b beats a")]
    make_experiment(root, findings=flipped)  # only the findings changed: the runs are still current
    (item,) = load_results(results, root)
    assert not item.stale and "findings changed since this run" in item.notes[0]
    assert [f.statement for f in item.spec.findings] == ["a beats b", "a matches b"]


def test_readme_summary_is_rewritten_between_the_markers(tmp_path: Path) -> None:
    root, results = tmp_path / "configs", tmp_path / "results"
    make_experiment(root)
    write_results(root, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nhand-written 99% reproduced\n{END}\nafter\n")
    code = main(["report", "--results-dir", str(results), "--out", str(tmp_path / "out"), "--readme", str(readme)])
    assert code == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n" + BEGIN + "\n") and text.endswith(END + "\nafter\n")
    assert "hand-written" not in text
    assert "1 experiments, 10 training runs, 2 findings: 1 reproduced, 1 not reproduced." in text
    assert "| C99 | a test | 2: 1 reproduced, 1 not reproduced | [c99_test](" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one <!-- claims:begin --> line"):
        write_readme(readme, ["x"])


def test_strict_report_command_refuses_stale_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, results = tmp_path / "configs", tmp_path / "results"
    make_experiment(root)
    write_results(root, results, provenance=None)
    code = main(["report", "--results-dir", str(results), "--out", str(tmp_path / "out"), "--strict"])
    # the command reads the shipped experiments: c99_test is not among them, so it is stale either way
    assert code == 2 and "stale results" in capsys.readouterr().err


def test_provenance_hashes_the_run_making_sources_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab, core = tmp_path / "bnzoo_lab", tmp_path / "bnzoo"
    for folder in (lab, core):
        folder.mkdir()
    (core / "norm.py").write_text("x = 1\n")
    (lab / "runner.py").write_text("y = 1\n")
    (lab / "report.py").write_text("z = 1\n")
    monkeypatch.setattr(provenance, "_packages", lambda: {"bnzoo": core, "bnzoo_lab": lab})
    first = provenance.source_hash()
    (lab / "report.py").write_text("z = 2\n")  # drawing and judging do not change a result
    assert provenance.source_hash() == first
    (core / "norm.py").write_text("x = 2\n")
    assert provenance.source_hash() != first
    monkeypatch.undo()
    state = provenance.git_state()  # this checkout
    assert re.fullmatch("[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)


def test_provenance_record_and_staleness(tmp_path: Path) -> None:
    make_experiment(tmp_path)
    spec = load_spec("c99_test", tmp_path)
    record = provenance.collect(spec)
    assert set(record) == {"commit", "dirty", "source_hash", "spec_hash", "setup_hash", "versions"}
    assert set(record["versions"]) >= {"python", "torch", "lightning", "timm", "bnzoo"}
    assert provenance.staleness(record, spec, record["source_hash"]) == []
    assert provenance.staleness(record, None, record["source_hash"]) == ["its experiment no longer exists"]
    make_experiment(tmp_path, findings=FINDINGS[:1])  # findings are not the setup
    assert provenance.staleness(record, load_spec("c99_test", tmp_path), record["source_hash"]) == []


def test_curves_show_diverged_seeds_as_such(tmp_path: Path) -> None:
    make_experiment(tmp_path)
    spec = load_spec("c99_test", tmp_path)
    runs = [run(v, s, ACC[v][i], diverged=v == "b" and s >= 3) for v in ("a", "b") for i, s in enumerate(SEEDS)]
    results = Results({"experiment": "c99_test", "seeds": SEEDS, "runs": runs})
    figure, ax = plt.subplots()
    _curve(ax, {"series": "val_acc"}, spec, results)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    plt.close(figure)
    assert labels == ["A", "B (3 seeds)", "B: diverged (2/5)"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    mean = lines["B (3 seeds)"].get_ydata()
    assert np.allclose(mean, np.mean([[a - 0.1, a - 0.05, a] for a in ACC["b"][:3]], axis=0))  # seeds 0-2 only
