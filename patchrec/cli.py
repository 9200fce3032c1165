"""``patchrec`` command line: one subcommand per module in ``patchrec.commands`` (imported lazily so that
``patchrec --help`` stays fast and a broken optional command never hides the others)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "prepare": "patchrec.commands.prepare",
    "stats": "patchrec.commands.stats",
    "baseline": "patchrec.commands.baseline",
    "eval": "patchrec.commands.eval",
    "train": "patchrec.commands.train",
    "demo": "patchrec.commands.demo",
    "reproduce": "patchrec.commands.reproduce",
    "bench": "patchrec.commands.bench",
    "results": "patchrec.commands.results",
    "serve": "patchrec.commands.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchrec",
        description="LLM sequential recommendation with compressed long user histories.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def _apply_threads(threads: int | None) -> None:
    """``--threads N`` of any command: torch's CPU intra-op threads (None or 0: torch's default)."""
    if threads is None:
        return
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        # transformers draws its own bars (loading and writing checkpoints); --no-progress means all bars.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        _apply_threads(getattr(args, "threads", None))
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"patchrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
