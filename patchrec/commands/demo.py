"""``patchrec demo``: the whole method end to end on synthetic data, no files needed.

Generates a synthetic dataset, trains a title BPE and a ``tiny`` Llama on catalog text (lists of
same-topic titles, standing in for an LLM's pre-training), then from that backbone: patch pre-training then
PFT-I, vanilla SFT on the full history and vanilla SFT on the newest items only (about PFT-I's history rows:
equal compute), all with the same optimizer steps of the same batch size; ranks the whole catalog exactly for
test samples next to popularity and a topic-count oracle with full vs short history (how much old history
matters). Prints one table (HR@10/20, NDCG@10/20, compression ratio, history rows, training speed).
``--backbone`` starts from a real model instead (no BPE, no catalog-text stage).
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
    parser.add_argument("--backbone", default=None, metavar="PATH",
                        help="run the demo from a real model (HF directory or .gguf, e.g. SmolLM2-135M) "
                             "instead of the tiny one trained on catalog text; smaller sizes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from patchrec.experiments.demo import main

    print(main(args.out, quick=args.quick, threads=args.threads, progress=not args.no_progress,
               backbone=args.backbone))
    return 0
