"""Flags several commands share, defined once: the PerSRec options (names, types and choices in one table;
each command words its own help, e.g. "default: the run's" in ``patchrec eval``) and the run options
(``--threads``, ``--no-progress``)."""

from __future__ import annotations

import argparse
from typing import Any

PERSREC_LAYOUTS = ("segments", "window", "rolling")
# flag -> argparse keywords besides the help; every PerSRec option defaults to None: "the command's default".
PERSREC_FLAGS: dict[str, dict[str, Any]] = {
    "--persrec-tokens": {"type": int},
    "--persrec-segment": {"type": int},
    "--persrec-old": {"choices": ("text", "item")},
    "--persrec-layout": {"choices": PERSREC_LAYOUTS},
    "--persrec-window": {"type": int},
    "--persrec-recent": {"type": int},
    "--persrec-unroll": {"type": int},
    "--persrec-cache": {"choices": ("on", "off")},
}


def add_persrec_flags(group: argparse._ActionsContainer, helps: dict[str, str]) -> None:
    """The PerSRec flags named in ``helps`` (flag -> help), in that order."""
    for flag, text in helps.items():
        group.add_argument(flag, default=None, help=text, **PERSREC_FLAGS[flag])


def add_run_flags(
    group: argparse._ActionsContainer, *, threads: str | None = "torch CPU threads",
    threads_default: int | None = None, progress: str = "no progress bars",
) -> None:  # fmt: skip
    """``--threads N`` (torch's CPU threads, applied by ``patchrec.cli``; ``threads`` None: no such flag)
    and ``--no-progress``, with the command's help texts."""
    if threads is not None:
        group.add_argument("--threads", type=int, default=threads_default, help=threads)
    group.add_argument("--no-progress", action="store_true", help=progress)


def flag_values(args: argparse.Namespace, names) -> dict[str, Any]:
    """``{name: args.name}`` for the given argparse destinations (e.g. a config dataclass's fields)."""
    return {name: getattr(args, name) for name in names}
