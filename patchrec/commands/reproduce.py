"""``patchrec reproduce``: vanilla SFT, pre-training -> PFT-I and pre-training -> PFT-S on one backbone, with
the same samples per step and steps per stage, ranked with the authors' beam protocol next to the zero-shot
backbone and the ID baselines (``patchrec.reproduce``).

Example (the committed CPU run; about an hour on 2 cores)::

    patchrec reproduce --data ../shared/data/patchrec/ml-100k \\
        --backbone ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out benches/results/reproduce-ml-100k-smollm2-cpu --scale cpu --resume

Writes summary.json, summary.md and summary.png into --out (and every stage's run and every evaluation's
results file underneath). --resume skips what is finished and continues an interrupted stage.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from patchrec.reproduce import SCALES

    parser = subparsers.add_parser(
        "reproduce",
        help="the paper's comparison (vanilla / PFT-I / PFT-S + baselines) on one backbone",
        description=__doc__ + "\nScales:\n" + "\n".join(f"  {k}: {v.why}" for k, v in SCALES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="release dir, e.g. ../shared/data/patchrec/ml-100k")
    parser.add_argument("--backbone", required=True, help="Llama checkpoint: HF directory or .gguf file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="what to run (default cpu)")
    parser.add_argument("--protocol", choices=("authors", "clean"), default="authors",
                        help="beam protocol (default authors: comparable with the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, data order and plans")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from patchrec.reproduce import Reproduction
    from patchrec.reproduce_report import summary_table

    job = Reproduction(args.data, args.backbone, args.out, args.scale, resume=args.resume,
                       protocol=args.protocol, progress=not args.no_progress, seed=args.seed)  # fmt: skip
    job.run()
    print(summary_table(json.loads((job.out / "summary.json").read_text())))
    print(f"wrote {job.out / 'summary.json'}, summary.md, summary.png")
    return 0
