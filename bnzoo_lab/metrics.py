"""Numbers derived from an experiment's results, and the verdict rules that judge a finding from them.

A *metric* maps one run's record to a number. Named metrics (a finding's ``metric:``, a string or a one-key
mapping with parameters):

==========================  =========================================================================================
``test_acc``, ``test_loss``  on the test split after training, eval mode (running statistics)
``recalibrated_test_acc``   the same after recalibrating the norm statistics (Ioffe & Szegedy 2015, Alg. 2)
``recalibration_gain``      ``recalibrated_test_acc - test_acc``
``variance_shift``          mean over norm layers of ``running_var / test-time Var[x]`` (Li et al. 2019)
``diverged``                1 if the training loss became non-finite, else 0
``failed``                  1 if the run diverged or its last validation accuracy is below twice chance (20% for
                            10 classes: it did not train), else 0
``final_val_acc``           the last validation accuracy; ``max_val_acc``: the best one; ``mean_val_acc``: the mean
                            of every validation accuracy of the run (the area under the learning curve: higher
                            means learning faster, or to a better end, or both)
``final_train_loss``        mean of the last 10% of the recorded training losses
``steps_to_target``         ``{target: 0.85}`` or ``{target: {max_val_acc_of: none}}``: the first validation step
                            whose accuracy reaches the target (that variant's best accuracy, the lowest over its
                            seeds so that each of them reaches it -- Ioffe & Szegedy's Fig. 3, "steps to match
                            Inception's 72.2%", Inception's best);
                            a run that never reaches it counts as ``last step + one validation interval`` and is
                            marked ">" (censored: the true number is larger)
``percentile_drift``        ``{skip: 0.1}``: how much the percentiles of ActivationPercentiles move over training,
                            relative to the distribution's width: for each unit, the standard deviation over
                            time of each percentile divided by the mean 15-85 spread, averaged over percentiles
                            and units (records after the first ``skip`` fraction of training)
``landscape``               ``{key: loss_range, skip: 0.0}``: mean over probe steps of a LandscapeProbe quantity
==========================  =========================================================================================

Rules (seeds are the unit of noise; every test at level ``ALPHA = 0.05``; :mod:`bnzoo_lab.stats` has the formulas):

* ``greater``: *reproduced* if Welch's one-sided t-test says ``mean(a) - mean(b) > min_margin`` (p <= alpha, i.e.
  the lower end of the 90% interval above ``min_margin``); *opposite* if it says ``mean(a) < mean(b)``; else
  *not reproduced (within noise)*. For a 0/1 metric (``diverged``, ``failed``) the test is the exact permutation
  test (Fisher's exact test), and the observed difference of the rates must also exceed ``min_margin``.
* ``less``: the same with the direction exchanged.
* ``close``: TOST against the finding's fixed ``tolerance`` (never widened by the noise): *reproduced* if the
  difference is significantly inside ``(-tolerance, tolerance)`` (the 90% interval inside it); *not reproduced*
  if it is significantly outside (a one-sided test beyond ``+-tolerance``); else *not reproduced (within noise)*.
* *too few seeds* when a measured side has fewer than ``MIN_SEEDS = 3`` values; *no verdict (non-finite values)*
  when a value is not finite (a diverged run's loss).

A side is a variant, a group of variants with a reduction (seed by seed), or a constant number (no variance: the
one-sample test). Censored values (``steps_to_target`` of runs that never reached the target) enter as their
lower bound, which understates a difference in the "fewer steps" direction.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .spec import BINARY_METRICS  # 0/1 per run: judged by the exact permutation (Fisher) test
from .stats import permutation_p, tost, welch

__all__ = [
    "ALPHA",
    "BINARY_METRICS",
    "METRICS",
    "MIN_SEEDS",
    "VERDICTS",
    "Judgement",
    "Results",
    "SideValues",
    "judge",
    "metric_name",
    "run_metric",
    "side_values",
]

REPRODUCED, OPPOSITE, WITHIN_NOISE, NOT_REPRODUCED = (
    "reproduced", "opposite", "not reproduced (within noise)", "not reproduced",
)  # fmt: skip
TOO_FEW, NO_VERDICT = "too few seeds", "no verdict (non-finite values)"
#: every verdict a finding can get
VERDICTS = (REPRODUCED, OPPOSITE, WITHIN_NOISE, NOT_REPRODUCED, TOO_FEW, NO_VERDICT)


class Results:
    """An experiment's results file, indexed: ``runs(variant)`` in seed order, the spec's variants."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.name: str = data["experiment"]
        self.seeds: list[int] = list(data["seeds"])
        self._runs: dict[str, list[dict[str, Any]]] = {}
        for run in data["runs"]:
            self._runs.setdefault(run["variant"], []).append(run)
        for runs in self._runs.values():
            runs.sort(key=lambda r: r["seed"])

    def variants(self) -> list[str]:
        return list(self._runs)

    def runs(self, variant: str) -> list[dict[str, Any]]:
        if variant not in self._runs:
            raise ValueError(f"{self.name}: no runs of variant {variant!r}; have: {', '.join(self._runs)}")
        return self._runs[variant]


# ----------------------------------------------------------------------------------------------------------
# Metrics of one run


def _val_interval(run: dict[str, Any]) -> int:
    steps = [v[0] for v in run.get("val") or []]
    return steps[1] - steps[0] if len(steps) > 1 else max(1, steps[0] if steps else 1)


def _steps_to_target(run: dict[str, Any], results: Results, target: Any = None) -> float:
    if isinstance(target, dict) and "max_val_acc_of" in target:
        target = min(_max_val_acc(r, results) for r in results.runs(target["max_val_acc_of"]))
    if not isinstance(target, (int, float)):
        raise ValueError(f"steps_to_target needs target: a number or {{max_val_acc_of: <variant>}}, got {target!r}")
    for step, acc, _ in run.get("val") or []:
        if acc >= target:
            return float(step)
    return -float(run.get("steps", 0) + _val_interval(run))  # negative: censored (see metric_value)


def _classes(run: dict[str, Any]) -> int:
    return int(run.get("num_classes", 10))


def _max_val_acc(run: dict[str, Any], results: Results) -> float:
    return max((v[1] for v in run.get("val") or []), default=math.nan)


def _percentile_drift(run: dict[str, Any], results: Results, skip: float = 0.0) -> float:
    records = run.get("percentiles") or []
    if not records:
        return math.nan
    last = max(r["step"] for r in records)
    by_unit: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if r["step"] >= skip * last:
            by_unit.setdefault((r["module"], r["unit"]), []).append(r)
    drifts = []
    for series in by_unit.values():
        keys = sorted((k for k in series[0] if k.startswith("p")), key=lambda k: float(k[1:]))
        width = statistics.fmean(s[keys[-1]] - s[keys[0]] for s in series)
        for key in keys:
            values = [s[key] for s in series]
            if len(values) > 1 and width > 0:
                drifts.append(statistics.pstdev(values) / width)
    return statistics.fmean(drifts) if drifts else math.nan


def _landscape(run: dict[str, Any], results: Results, key: str = "loss_range", skip: float = 0.0) -> float:
    records = run.get("landscape") or []
    if not records:
        return math.nan
    last = max(r["step"] for r in records)
    values = [r[key] for r in records if r["step"] >= skip * last and math.isfinite(r[key])]
    return statistics.fmean(values) if values else math.nan


def _field(name: str) -> Callable[..., float]:
    def value(run: dict[str, Any], results: Results) -> float:
        v = run.get(name)
        return math.nan if v is None else float(v)

    return value


METRICS: dict[str, Callable[..., float]] = {
    "test_acc": _field("test_acc"),
    "test_loss": _field("test_loss"),
    "recalibrated_test_acc": _field("recalibrated_test_acc"),
    "recalibration_gain": lambda run, results: float(run["recalibrated_test_acc"] - run["test_acc"]),
    "variance_shift": lambda run, results: float((run.get("variance_shift") or {}).get("mean", math.nan)),
    "diverged": lambda run, results: float(run.get("diverged_at") is not None),
    "failed": lambda run, results: float(
        run.get("diverged_at") is not None or not run.get("val") or not run["val"][-1][1] >= 2.0 / _classes(run)
    ),
    "final_val_acc": lambda run, results: float(run["val"][-1][1]) if run.get("val") else math.nan,
    "max_val_acc": _max_val_acc,
    "mean_val_acc": lambda run, results: statistics.fmean(v[1] for v in run["val"]) if run.get("val") else math.nan,
    "final_train_loss": lambda run, results: statistics.fmean(
        v for _, v in (run.get("train_loss") or [[0, math.nan]])[-max(1, len(run.get("train_loss") or []) // 10) :]
    ),
    "steps_to_target": _steps_to_target,
    "percentile_drift": _percentile_drift,
    "landscape": _landscape,
}


def metric_name(metric: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, parameters)`` of a metric given as ``"name"`` or ``{name: {parameters}}``."""
    if isinstance(metric, str):
        name, params = metric, {}
    elif isinstance(metric, dict) and len(metric) == 1:
        ((name, params),) = metric.items()
        params = params or {}
    else:
        raise ValueError(f"a metric is a name or a one-key mapping {{name: {{parameters}}}}, got {metric!r}")
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return name, params


def run_metric(metric: str | dict[str, Any], run: dict[str, Any], results: Results) -> tuple[float, bool]:
    """``(value, censored)`` of ``metric`` for one run; ``censored`` marks a lower bound (steps_to_target)."""
    name, params = metric_name(metric)
    value = METRICS[name](run, results, **params)
    if name == "steps_to_target" and value < 0:
        return -value, True
    return value, False


# ----------------------------------------------------------------------------------------------------------
# Sides and rules


@dataclass(frozen=True)
class SideValues:
    """One side of a finding: its label, a value per seed, and which of them are censored."""

    label: str
    values: list[float]
    censored: list[bool]
    constant: bool = False  # a number in the spec (one exact value), not a measurement

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "range": lambda v: max(v) - min(v),
    "mean": statistics.fmean,
    "min": min,
    "max": max,
    "std": lambda v: statistics.pstdev(v),
}


def side_values(side: str | dict[str, Any], metric: str | dict[str, Any], results: Results,
                labels: dict[str, str]) -> SideValues:  # fmt: skip
    """The metric's value per seed for a variant, or reduced over a group of variants seed by seed, or a constant
    (a number: e.g. 0 for "the gain is positive")."""
    if isinstance(side, (int, float)) and not isinstance(side, bool):
        return SideValues(f"{side:g}", [float(side)], [False], constant=True)
    if isinstance(side, str):
        pairs = [run_metric(metric, run, results) for run in results.runs(side)]
        return SideValues(labels.get(side, side), [v for v, _ in pairs], [c for _, c in pairs])
    variants, reduce = side["variants"], side.get("reduce", "mean")
    per_seed = [[run_metric(metric, run, results)[0] for run in results.runs(v)] for v in variants]
    values = [_REDUCERS[reduce]([column[i] for column in per_seed]) for i in range(min(map(len, per_seed)))]
    label = f"{reduce} over {labels.get(variants[0], variants[0])} .. {labels.get(variants[-1], variants[-1])}"
    return SideValues(label, values, [False] * len(values))


#: every test's level, and the fewest values a measured side needs for a verdict
ALPHA, MIN_SEEDS = 0.05, 3


@dataclass(frozen=True)
class Judgement:
    """A finding judged: the two sides, the difference of their means, the verdict and the test behind it --
    its name, its p-value (None where no test ran) and the 90% interval of the difference (None for the exact
    test and where no test ran; each end is a one-sided 95% bound); ``note`` says why no test ran."""

    a: SideValues
    b: SideValues
    difference: float
    verdict: str
    test: str
    p_value: float | None = None
    interval: tuple[float, float] | None = None
    note: str = ""
    bound: float = 0.0  # close: the tolerance; greater/less: the min_margin the difference must exceed


def _values(side: SideValues) -> list[float] | float:
    return side.values[0] if side.constant else side.values


def _judge_binary(rule: str, a: SideValues, b: SideValues, difference: float, min_margin: float) -> Judgement:
    if a.constant or b.constant:
        raise ValueError("a 0/1 metric compares two measured sides, not a constant")
    if rule == "close":
        raise ValueError("close (equivalence) is not defined for a 0/1 metric; use greater or less")
    forward, backward = ("greater", "less") if rule == "greater" else ("less", "greater")
    p = permutation_p(a.values, b.values, forward)
    signed = difference if rule == "greater" else -difference
    if p <= ALPHA and signed > min_margin:
        verdict = REPRODUCED
    elif permutation_p(a.values, b.values, backward) <= ALPHA:
        verdict = OPPOSITE
    else:
        verdict = WITHIN_NOISE
    return Judgement(a, b, difference, verdict, "exact permutation (Fisher), one-sided", p, bound=min_margin)


def judge(rule: str, a: SideValues, b: SideValues, min_margin: float = 0.0, tolerance: float = 0.0,
          binary: bool = False) -> Judgement:  # fmt: skip
    """Apply ``rule`` (greater, less, close) to two sides; see the module docstring. ``binary``: the metric is
    0/1 per run (:data:`BINARY_METRICS`)."""
    if rule not in ("greater", "less", "close"):
        raise ValueError(f"unknown rule {rule!r}; valid: greater, less, close")
    if rule == "close" and not tolerance > 0:
        raise ValueError(f"close needs a positive tolerance, got {tolerance!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin!r}")
    difference = a.mean - b.mean
    if not all(math.isfinite(v) for v in a.values + b.values):
        bad = sum(not math.isfinite(v) for v in a.values + b.values)
        return Judgement(a, b, difference, NO_VERDICT, "none", note=f"{bad} value(s) not finite")
    short = [s for s in (a, b) if not s.constant and len(s.values) < MIN_SEEDS]
    if short:
        counts = ", ".join(f"{s.label}: {len(s.values)}" for s in short)
        return Judgement(a, b, difference, TOO_FEW, "none", note=f"needs {MIN_SEEDS} seeds a side ({counts})")
    if binary:
        return _judge_binary(rule, a, b, difference, min_margin)
    test = welch(_values(a), _values(b))
    interval = test.interval(1 - 2 * ALPHA)
    if rule == "close":
        p = tost(test, tolerance)
        outside = min(test.p_greater(tolerance), test.p_less(-tolerance))
        verdict = REPRODUCED if p <= ALPHA else NOT_REPRODUCED if outside <= ALPHA else WITHIN_NOISE
        return Judgement(a, b, difference, verdict, "TOST (Welch)", p, interval, bound=tolerance)
    if rule == "greater":
        p, p_back = test.p_greater(min_margin), test.p_less(0.0)
    else:
        p, p_back = test.p_less(-min_margin), test.p_greater(0.0)
    verdict = REPRODUCED if p <= ALPHA else OPPOSITE if p_back <= ALPHA else WITHIN_NOISE
    return Judgement(a, b, difference, verdict, "Welch t, one-sided", p, interval, bound=min_margin)


# ----------------------------------------------------------------------------------------------------------
# Inference statistics compared (claim C9): the test accuracy with each kind of statistics of the same weights

#: a run's test-accuracy field for each kind of inference statistics
STATISTICS_FIELDS = {"moving_average": "test_acc", "alg2": "recalibrated_test_acc", "population": "population_test_acc"}


def _statistics_gap(run: dict[str, Any], results: Results, a: str = "alg2", b: str = "moving_average") -> float:
    """``{statistics_gap: {a: alg2, b: population}}``: test accuracy with statistics ``a`` minus with ``b``, the
    same weights (one of moving_average -- the running averages kept in training --, alg2 -- recalibrated by
    Ioffe & Szegedy 2015, Alg. 2 --, population -- the exact moments of the same batches)."""
    for side in (a, b):
        if side not in STATISTICS_FIELDS:
            raise ValueError(f"statistics_gap: unknown statistics {side!r}; valid: {', '.join(STATISTICS_FIELDS)}")
    values = [run.get(STATISTICS_FIELDS[side]) for side in (a, b)]
    return math.nan if None in values else float(values[0] - values[1])


METRICS["statistics_gap"] = _statistics_gap
