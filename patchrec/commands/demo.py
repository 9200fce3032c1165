"""``patchrec demo``: the whole method end to end on synthetic data, no files needed.

Generates a synthetic dataset, trains a title BPE, trains a ``tiny`` Llama with patch pre-training then PFT-I
and a vanilla SFT baseline with the same data budget, and ranks the whole catalog exactly for test samples
next to a popularity baseline. Prints one table (HR@10/20, NDCG@10/20, compression ratio, training speed).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on synthetic data (pretrain -> PFT-I vs vanilla SFT vs popularity)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=None, help="keep the artifacts (models, logs, results.json) here")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version (tests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier on a shared machine; 0 = torch default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from patchrec.demo import main

    print(main(args.out, quick=args.quick, threads=args.threads, progress=not args.no_progress))
    return 0
