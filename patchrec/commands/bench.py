"""``patchrec bench report``: pytest-benchmark JSON -> ``report.md`` (ratio tables) + PNG plots.

Example::

    pytest benches --benchmark-json=benches/results/cpu.json
    patchrec bench report benches/results/cpu.json --out benches/results/cpu-report

Ratios only divide numbers of the same results file (see ``patchrec.bench_report``). Plots need matplotlib
(the ``plot`` extra: ``pip install 'patchrec[plot]'``).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark reports (ratio tables and plots from pytest-benchmark JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    report = sub.add_parser(
        "report",
        help="write report.md and PNG plots from pytest-benchmark JSON files",
        description="Turn pytest-benchmark JSON files into a Markdown table of ratios and PNG plots.",
    )
    report.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json output)")
    report.add_argument("--out", default="bench-report", help="output directory (default: bench-report)")
    report.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'patchrec[plot]'") from None
    from patchrec.bench_report import write_report

    report = write_report(args.results, args.out)
    print(f"wrote {report} and its plots in {report.parent}")
    return 0
