"""``patchrec prepare``: write a dataset in the release format, from raw MovieLens files or synthetic.

patchrec prepare --raw DIR [--format {ml-100k,ml-1m}] --out DIR [--force]
patchrec prepare --synthetic [--users N --items M --mean-length L --seed S ...] --out DIR [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from patchrec.data.dataset import SPLITS, Dataset, make_samples
from patchrec.data.movielens import FORMATS, load_movielens
from patchrec.data.release import ID2TITLE, PROMPT, SEQUENCES, write_release
from patchrec.data.synthetic import SyntheticConfig, make_synthetic


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare",
        help="write a dataset in the release format (raw MovieLens or synthetic)",
        description="Write id2title.txt, sequences.jsonl and prompt.txt (the release format) to --out.",
    )
    source = parser.add_argument_group("source (exactly one)")
    source.add_argument(
        "--raw", type=Path, help="raw MovieLens directory (u.data+u.item or ratings.dat+movies.dat)"
    )
    source.add_argument("--synthetic", action="store_true", help="generate a synthetic dataset")
    source.add_argument(
        "--format", choices=sorted(FORMATS), help="raw format (default: detected from the files)"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output directory (created)")
    out.add_argument("--force", action="store_true", help="replace the release files in a non-empty --out")
    out.add_argument(
        "--max-items", type=int, default=100, help="history length L for the sample counts printed"
    )
    syn = parser.add_argument_group("synthetic options")
    defaults = SyntheticConfig()
    syn.add_argument("--users", type=int, default=defaults.num_users, help="number of users")
    syn.add_argument("--items", type=int, default=defaults.num_items, help="catalog size")
    syn.add_argument("--mean-length", type=float, default=defaults.mean_length, help="mean items per user")
    syn.add_argument("--topics", type=int, default=defaults.num_topics, help="topic (genre) clusters")
    syn.add_argument("--interests", type=int, default=defaults.interests, help="long-lived topics per user")
    syn.add_argument(
        "--long-term-share",
        type=float,
        default=defaults.long_term_share,
        help="probability an item comes from a long-lived topic",
    )
    syn.add_argument(
        "--drift-length",
        type=float,
        default=defaults.drift_length,
        help="mean items before the short-lived topic changes",
    )
    syn.add_argument("--seed", type=int, default=defaults.seed, help="random seed (same seed, same dataset)")
    parser.set_defaults(run=run)
    return parser


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"--out {out} is not empty (pass --force to replace its release files)")
        others = sorted(p.name for p in out.iterdir() if p.name not in (ID2TITLE, SEQUENCES, PROMPT))
        if others:
            # --force replaces a release, it never deletes unrelated files.
            raise ValueError(f"--out {out} holds files that are not release files: {others[:5]}")


def summary(dataset: Dataset, max_items: int) -> str:
    counts = " ".join(f"{s}={len(make_samples(dataset, s, max_items))}" for s in SPLITS)
    return (
        f"{dataset.name}: {dataset.num_users} users, {dataset.num_items} items, "
        f"{len(dataset.items)} interactions; samples (L={max_items}) {counts}"
    )


def run(args: argparse.Namespace) -> int:
    if bool(args.raw) == bool(args.synthetic):
        raise ValueError("give exactly one of --raw DIR or --synthetic")
    if args.format and not args.raw:
        raise ValueError("--format only applies with --raw")
    _check_out(args.out, args.force)
    item_ids = None
    if args.raw:
        dataset, movielens_ids = load_movielens(args.raw, args.format)
        item_ids = movielens_ids - 1  # the release's ids (docs/method.md §4), gaps included for ML-1M
    else:
        dataset = make_synthetic(
            num_users=args.users,
            num_items=args.items,
            mean_length=args.mean_length,
            seed=args.seed,
            num_topics=args.topics,
            interests=args.interests,
            long_term_share=args.long_term_share,
            drift_length=args.drift_length,
        )
    try:
        write_release(dataset, args.out, item_ids=item_ids, overwrite=args.force, progress=True)
    except BaseException:
        # A half-written release must not look like a valid one.
        for name in (ID2TITLE, SEQUENCES, PROMPT):
            (args.out / name).unlink(missing_ok=True)
        raise
    print(summary(dataset, args.max_items))
    return 0
