"""``patchrec results``: check that every committed result and every result table quoted in the docs is what
its raw files give, or print a result's tables.

Example::

    patchrec results check                      # the repository this command runs from
    patchrec results render persrec-id-ml1m     # its blocks, ready to paste into a docs page

How results are registered and quoted: ``patchrec.reports.results_check`` (module docstring) and
docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "results",
        help="recompute every committed result from its raw files and check the docs' tables against it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("check", "render"), help="check everything, or render one result")
    parser.add_argument("name", nargs="?", help="render: the result (a name under benches/results/)")
    parser.add_argument("--root", default=str(ROOT), help="repository root (default: this checkout)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from patchrec.reports.results_check import check, render

    root = Path(args.root)
    if args.action == "render":
        if not args.name:
            raise ValueError("results render needs a result name")
        for block, text in render(root, args.name).items():
            print(f"<!-- result: {args.name}/{block} -->\n{text}<!-- /result -->\n")
        return 0
    problems = check(root)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "every result matches its raw files")
    return 1 if problems else 0
