"""``patchrec stats``: dataset sizes, title token lengths and compression ratios of a release.

Example::

    patchrec stats --data data/ml-1m --tokenizer path/to/llama3 --json

Definitions of every figure: ``patchrec.batching.stats`` (module docstring).
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "stats",
        help="dataset statistics and compression ratios (PFT-I, PFT-S) of a release with a tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="release directory (id2title.txt, sequences.jsonl)")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (local)")
    parser.add_argument("--max-items", type=int, default=100, help="history length L (default 100)")
    parser.add_argument(
        "--group-size", type=int, default=5, help="PFT-S session size G (default 5; the paper: 20 on ML-100K)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # Heavy imports (transformers, torch) only when the command runs, so `patchrec --help` stays fast.
    from patchrec.batching.stats import dataset_stats, format_stats
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.release import load_release

    dataset = load_release(args.data)
    tokens = tokenize_dataset(load_tokenizer(args.tokenizer), dataset)
    stats = dataset_stats(dataset, tokens, max_items=args.max_items, group_size=args.group_size)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0
