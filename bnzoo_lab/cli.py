"""``bnzoo experiment``: list, run and report the claims experiments.

bnzoo experiment list
bnzoo experiment run c1_ics [--quick] [--seeds 0 1 2] [--threads 1]
bnzoo experiment run all --jobs 2 --threads 1        # the whole suite, two experiments at a time
bnzoo experiment report [--results-dir reports/results] [--out reports] [--readme README.md] [--strict]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["main"]

QUICK_DIR = Path("runs/experiments-quick")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnzoo experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the experiments, their claims and titles")
    run = commands.add_parser("run", help="train and measure experiments; results to <results-dir>/<name>.json")
    run.add_argument("names", nargs="+", help="experiment names (see `list`), or `all`")
    run.add_argument("--quick", action="store_true",
                     help=f"a few steps per run (smoke test); results default to {QUICK_DIR}/results")  # fmt: skip
    run.add_argument("--seeds", type=int, nargs="+", help="override the spec's seeds")
    run.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    run.add_argument("--jobs", type=int, default=1, help="experiments run at once, each in its own process")
    run.add_argument("--runs-dir", type=Path, help="TensorBoard logs and run configs (default runs/experiments)")
    run.add_argument("--results-dir", type=Path, help="where <name>.json goes (default reports/results)")
    run.add_argument("--report", action="store_true", help="write the report afterwards (into the results' parent)")
    report = commands.add_parser("report", help="claims.md and a PNG per experiment, from the results files")
    report.add_argument("--results-dir", type=Path, default=Path("reports/results"))
    report.add_argument("--out", type=Path, help="default: the parent of --results-dir")
    report.add_argument(
        "--readme",
        type=Path,
        help="also rewrite the claims summary between <!-- claims:begin --> and <!-- claims:end -->",
    )
    report.add_argument(
        "--strict",
        action="store_true",
        help="refuse results made by other code or another setup (stale) instead of marking them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bnzoo experiment``; returns the exit code. The lab's norm kinds and models exist while it
    runs (:func:`bnzoo_lab.registrations.lab_registrations`)."""
    from .registrations import lab_registrations

    with lab_registrations():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from . import report, runner, spec  # after parsing: --help stays fast

    if args.command == "list":
        for name in spec.list_experiments():
            s = spec.load_spec(name)
            print(f"{name:<20} {', '.join(s.claims):<8} {s.title}")
        return 0
    if args.command == "report":
        try:
            path = report.write_report(args.results_dir, args.out or args.results_dir.parent, strict=args.strict,
                                       readme=args.readme)  # fmt: skip
        except ValueError as err:
            print(f"bnzoo experiment report: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {path}" + (f" and the summary in {args.readme}" if args.readme else ""))
        return 0
    names = spec.list_experiments() if args.names == ["all"] else args.names
    try:
        for name in names:
            spec.load_spec(name)  # fail early, naming the bad experiment
    except ValueError as err:
        print(f"bnzoo experiment: error: {err}", file=sys.stderr)
        return 2
    base = QUICK_DIR if args.quick else Path("runs/experiments")
    runs_dir = args.runs_dir or (QUICK_DIR / "runs" if args.quick else base)
    results_dir = args.results_dir or (QUICK_DIR / "results" if args.quick else Path("reports/results"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.jobs > 1 or len(names) > 1:
        suite = runner.run_suite(names, jobs=args.jobs, threads=args.threads, quick=args.quick, seeds=args.seeds,
                                 runs_dir=runs_dir, results_dir=results_dir)  # fmt: skip
        status = 1 if suite["failed"] else 0
    else:
        runner.run_experiment(names[0], quick=args.quick, seeds=args.seeds, runs_dir=runs_dir,
                              results_dir=results_dir)  # fmt: skip
        status = 0
    if args.report:
        print(f"wrote {report.write_report(results_dir, results_dir.parent)}")
    return status
