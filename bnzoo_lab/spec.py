"""An experiment as data: ``configs/experiments/<name>/experiment.yaml`` read into an :class:`ExperimentSpec`.

An experiment is a base ``bnzoo fit`` config, a set of *variants* (each a nested override of that config), seeds,
what to measure after training, the *findings* to judge (claim, source number, metric, rule) and the figure
panels. Example (abridged)::

    claim: [C1]
    title: BN keeps a sigmoid's input distribution stable
    source: Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1
    setup: MLP 3x100 sigmoid, batch 60, Fashion-MNIST, 3000 steps
    notes: how to read the result (optional; shown under the findings)
    config: base.yaml                  # relative to the experiment's folder
    seeds: [0, 1, 2, 3, 4]              # at least 3; 5 where a run takes under a minute
    variants:
      none: {label: no norm, config: {model: {init_args: {norm: none}}}}
      bn: {label: BN, config: {model: {init_args: {norm: bn}}}}
    quick: {trainer: {max_steps: 4}}   # merged into every run by --quick
    measure: [test]
    findings:
      - {claim: C1, statement: BN reaches a higher test accuracy, source: "...", metric: test_acc,
         rule: greater, a: bn, b: none}
    figure:
      - {kind: curve, series: val_acc, title: validation accuracy}

Every key is checked when the file is read: an unknown key, variant, rule or measurement fails with the valid
choices in the message.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bnzoo.resources import config_dir

__all__ = [
    "CONFIG_ROOT",
    "MEASURES",
    "RULES",
    "ExperimentSpec",
    "Finding",
    "Variant",
    "deep_merge",
    "list_experiments",
    "load_spec",
]

#: where ``bnzoo experiment`` looks for experiments: the shipped ``configs/experiments`` (package data, so an
#: installed bnzoo has them too; :func:`bnzoo.resources.config_dir`)
CONFIG_ROOT = config_dir() / "experiments"

#: post-training measurements a spec may ask for (see :mod:`bnzoo_lab.runner`)
MEASURES: tuple[str, ...] = ("test", "recalibrated", "variance_shift")

#: verdict rules of a finding (see :mod:`bnzoo_lab.metrics`)
RULES: tuple[str, ...] = ("greater", "less", "close")

#: seeds a variant needs: at least ``MIN_SEEDS``, and ``MIN_SEEDS_FAST`` where one run is expected to take under
#: ``FAST_RUN_MINUTES`` (``expected_minutes / (variants x seeds)``): cheap runs buy their noise estimate with seeds
MIN_SEEDS, MIN_SEEDS_FAST, FAST_RUN_MINUTES = 3, 5, 1.0

#: metrics that are 0 or 1 per run (compared by an exact test of the rates, never with ``close`` or a constant)
BINARY_METRICS: tuple[str, ...] = ("diverged", "failed")

_SPEC_KEYS = ("claim", "title", "source", "setup", "notes", "config", "seeds", "quick_seeds", "variants", "quick",
              "measure", "test_batches", "recalibration", "findings", "figure", "expected_minutes")  # fmt: skip
_VARIANT_KEYS = ("label", "config", "x")
_FINDING_KEYS = ("claim", "statement", "source", "metric", "rule", "a", "b", "min_margin", "tolerance")


def _check_keys(what: str, mapping: Any, valid: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise ValueError(f"{what} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return mapping


def _check_name(what: str, name: Any, valid: list[str]) -> str:
    if not isinstance(name, str) or name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{what}: unknown {name!r}{hint}; valid: {', '.join(valid)}")
    return name


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``override`` merged in, mappings recursively; any other value (lists included)
    replaces the base's."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment: ``config`` is merged into the base config; ``x`` places it on a sweep's axis."""

    name: str
    label: str
    config: dict[str, Any]
    x: float | None = None


@dataclass(frozen=True)
class Finding:
    """A claim judged from numbers: ``metric`` of side ``a`` against side ``b`` by ``rule``.

    A side is a variant name, or ``{variants: [...], reduce: range|mean|min|max|std}`` (the metric reduced over
    those variants seed by seed, e.g. the range of accuracy across a sweep of initialization scales), or a
    number (a constant, e.g. 0).
    """

    claim: str
    statement: str
    source: str
    metric: str | dict[str, Any]
    rule: str
    a: str | float | dict[str, Any]
    b: str | float | dict[str, Any]
    min_margin: float = 0.0
    tolerance: float = 0.0


@dataclass(frozen=True)
class ExperimentSpec:
    """A parsed, checked ``experiment.yaml``; see the module docstring."""

    name: str
    folder: Path
    claims: list[str]
    title: str
    source: str
    setup: str
    config: str
    seeds: list[int]
    quick_seeds: list[int]
    variants: dict[str, Variant]
    quick: dict[str, Any]
    measure: list[str]
    test_batches: int | None
    recalibration: dict[str, Any]
    findings: list[Finding]
    figure: list[dict[str, Any]]
    expected_minutes: float = 1.0
    notes: str = ""

    def base_config(self) -> dict[str, Any]:
        """The base ``bnzoo fit`` config as a dict."""
        return yaml.safe_load((self.folder / self.config).read_text()) or {}

    def summary(self) -> dict[str, Any]:
        """The spec as plain data (stored with the results)."""
        data = asdict(self)
        data["folder"] = str(self.folder)
        return data


def _parse_variants(name: str, raw: Any) -> dict[str, Variant]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"experiment {name!r}: variants must be a non-empty mapping of name -> settings")
    variants = {}
    for key, settings in raw.items():
        settings = _check_keys(f"experiment {name!r}, variant {key!r}", settings or {}, _VARIANT_KEYS)
        config = settings.get("config", {}) or {}
        if not isinstance(config, dict):
            raise ValueError(f"experiment {name!r}, variant {key!r}: config must be a mapping")
        x = settings.get("x")
        variants[str(key)] = Variant(str(key), str(settings.get("label", key)), config, None if x is None else float(x))
    return variants


def _check_side(what: str, side: Any, variants: list[str]) -> str | float | dict[str, Any]:
    if isinstance(side, (int, float)) and not isinstance(side, bool):
        return float(side)
    if isinstance(side, dict):
        _check_keys(what, side, ("variants", "reduce"))
        for v in side.get("variants") or []:
            _check_name(what, v, variants)
        if not side.get("variants"):
            raise ValueError(f"{what}: a group needs a non-empty list of variants")
        _check_name(f"{what} reduce", side.get("reduce", "mean"), ["range", "mean", "min", "max", "std"])
        return side
    return _check_name(what, side, variants)


def _check_rule(what: str, item: dict[str, Any]) -> None:
    """The rule's parameters: close needs a fixed positive tolerance; a 0/1 metric compares two variants."""
    tolerance, margin = item.get("tolerance", 0.0), item.get("min_margin", 0.0)
    for key, value in (("tolerance", tolerance), ("min_margin", margin)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{what}: {key} must be a number >= 0, got {value!r}")
    if item["rule"] == "close" and not tolerance > 0:
        raise ValueError(f"{what}: rule close needs a positive tolerance (the fixed equivalence margin), got "
                         f"{tolerance!r}")  # fmt: skip
    metric = item["metric"]
    name = metric if isinstance(metric, str) else next(iter(metric), None) if isinstance(metric, dict) else None
    if name in BINARY_METRICS:
        if item["rule"] == "close":
            raise ValueError(f"{what}: {name} is 0/1 per run; rule close is not defined for it (valid: greater, less)")
        if any(isinstance(item[k], (int, float)) and not isinstance(item[k], bool) for k in ("a", "b")):
            raise ValueError(f"{what}: {name} is 0/1 per run; compare two variants, not a variant and a constant")


def _check_seeds(name: str, seeds: list[int], variants: int, expected_minutes: float) -> None:
    """At least :data:`MIN_SEEDS` distinct seeds, :data:`MIN_SEEDS_FAST` where a run takes under a minute."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"experiment {name!r}: seeds {seeds} repeat a seed")
    per_run = expected_minutes / (variants * max(1, len(seeds)))
    needed = MIN_SEEDS_FAST if per_run < FAST_RUN_MINUTES else MIN_SEEDS
    if len(seeds) < needed:
        why = (f"a run is expected to take {per_run:.2g} min: expected_minutes {expected_minutes:g} / {variants} "
               f"variants / {len(seeds)} seeds")  # fmt: skip
        rule = f"{MIN_SEEDS}, {MIN_SEEDS_FAST} where a run takes under {FAST_RUN_MINUTES:g} min"
        raise ValueError(f"experiment {name!r}: {len(seeds)} seed(s) {seeds}, needs at least {needed} ({rule}; {why})")


def _parse_findings(name: str, raw: Any, variants: list[str]) -> list[Finding]:
    findings = []
    for index, item in enumerate(raw or []):
        what = f"experiment {name!r}, finding {index + 1}"
        item = _check_keys(what, item, _FINDING_KEYS)
        missing = [k for k in ("claim", "statement", "metric", "rule", "a", "b") if k not in item]
        if missing:
            raise ValueError(f"{what}: missing {', '.join(missing)}")
        _check_name(f"{what} rule", item["rule"], list(RULES))
        _check_rule(what, item)
        findings.append(
            Finding(
                claim=str(item["claim"]),
                statement=str(item["statement"]),
                source=str(item.get("source", "")),
                metric=item["metric"],
                rule=item["rule"],
                a=_check_side(f"{what} side a", item["a"], variants),
                b=_check_side(f"{what} side b", item["b"], variants),
                min_margin=float(item.get("min_margin", 0.0)),
                tolerance=float(item.get("tolerance", 0.0)),
            )
        )
    return findings


def load_spec(name_or_path: str | Path, root: Path | None = None) -> ExperimentSpec:
    """Read and check an experiment: a name under ``root`` (default :data:`CONFIG_ROOT`), or a folder or
    ``experiment.yaml`` path."""
    path = Path(name_or_path)
    if not path.exists():
        base = root or CONFIG_ROOT
        if not (base / str(name_or_path)).is_dir():
            _check_name("experiment", str(name_or_path), list_experiments(base))
        path = base / str(name_or_path)
    folder = path if path.is_dir() else path.parent
    file = folder / "experiment.yaml"
    raw = _check_keys(f"{file}", yaml.safe_load(file.read_text()) or {}, _SPEC_KEYS)
    name = folder.name
    for key in ("claim", "title", "config", "variants"):
        if key not in raw:
            raise ValueError(f"experiment {name!r} ({file}) misses the key {key!r}")
    if not (folder / raw["config"]).is_file():
        raise ValueError(f"experiment {name!r}: config file {folder / raw['config']} does not exist")
    variants = _parse_variants(name, raw["variants"])
    seeds = [int(s) for s in raw.get("seeds", [0])]
    expected_minutes = float(raw.get("expected_minutes", 1.0))
    _check_seeds(name, seeds, len(variants), expected_minutes)
    measure = [str(m) for m in raw.get("measure", ["test"])]
    for m in measure:
        _check_name(f"experiment {name!r} measure", m, list(MEASURES))
    claims = raw["claim"] if isinstance(raw["claim"], list) else [raw["claim"]]
    return ExperimentSpec(
        name=name,
        folder=folder,
        claims=[str(c) for c in claims],
        title=str(raw["title"]),
        source=str(raw.get("source", "")),
        setup=" ".join(str(raw.get("setup", "")).split()),
        config=str(raw["config"]),
        seeds=seeds,
        quick_seeds=[int(s) for s in raw.get("quick_seeds", seeds[:1])],
        variants=variants,
        quick=raw.get("quick", {}) or {},
        measure=measure,
        test_batches=raw.get("test_batches"),
        recalibration=dict(raw.get("recalibration", {}) or {}),
        findings=_parse_findings(name, raw.get("findings"), list(variants)),
        figure=list(raw.get("figure", []) or []),
        expected_minutes=expected_minutes,
        notes=" ".join(str(raw.get("notes", "")).split()),
    )


def list_experiments(root: Path | None = None) -> list[str]:
    """The experiment names (folders with an ``experiment.yaml``) under ``root``, sorted by claim number."""
    base = root or CONFIG_ROOT
    names = [p.parent.name for p in base.glob("*/experiment.yaml")] if base.is_dir() else []
    return sorted(names, key=_claim_order)


def _claim_order(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
    return (int(digits) if digits else 10**6, name)
