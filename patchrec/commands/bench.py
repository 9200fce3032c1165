"""``patchrec bench report``: pytest-benchmark JSON -> ``report.md`` (ratio tables) + PNG plots.
``patchrec bench gpu``: validate a CUDA GPU in one command (``benches/gpu_check.sh``).

Example::

    pytest benches --benchmark-json=benches/results/cpu.json
    patchrec bench report benches/results/cpu.json --out benches/results/cpu-report
    patchrec bench gpu --dry-run        # the GPU check's plan; without --dry-run, on a CUDA machine, runs it

Ratios only divide numbers of the same results file (see ``patchrec.reports.bench_report``). Plots need
matplotlib (the ``plot`` extra: ``pip install 'patchrec[plot]'``). The GPU check lives in the source
checkout (``benches/gpu_check.py``), beside the benches it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

GPU_CHECK = Path(__file__).resolve().parents[2] / "benches" / "gpu_check.py"


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
    gpu = sub.add_parser(
        "gpu",
        help="validate a CUDA GPU: GPU tests, kernel / training / inference benches, SmolLM2 parity",
        description="The check benches/gpu_check.sh runs: every GPU test and bench within one budget, "
        "results under benches/results/gpu-<device>/. --dry-run prints the plan on any machine.",
    )
    try:
        check = _gpu_check()
    except Exception:  # a broken check must not break the other commands; running it shows the error
        check = None
    if check is not None:
        check.add_arguments(gpu)
    gpu.set_defaults(run=run_gpu)
    return parser


def _gpu_check():
    """benches/gpu_check.py of the source checkout, or None (an installed package has no benches/)."""
    if not GPU_CHECK.is_file():
        return None
    name = "patchrec_gpu_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GPU_CHECK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def run_gpu(args: argparse.Namespace) -> int:
    check = _gpu_check()
    if check is None:
        raise FileNotFoundError(f"{GPU_CHECK}: the GPU check needs the source checkout (benches/)")
    return check.run(args)


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'patchrec[plot]'") from None
    from patchrec.reports.bench_report import write_report

    report = write_report(args.results, args.out)
    print(f"wrote {report} and its plots in {report.parent}")
    return 0
