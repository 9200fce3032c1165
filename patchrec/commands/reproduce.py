"""``patchrec reproduce``: the paper's experiments on one backbone (``patchrec.experiments.reproduce``):
vanilla SFT, patch pre-training -> PFT-I / PFT-S, and the ID baselines (table2); PFT-I / PFT-S without
pre-training (table3); the pre-training stage alone under compression (table4); the dropout ablation
(dropout); K = G = 20 at longer histories and the cost curve (long). Every LLM stage trains on the same
samples with the same samples per step and steps; LLM rows are ranked with the authors' beam protocol.

Examples::

    # what a run will do, its sizes and estimated GPU hours; nothing is trained
    patchrec reproduce --data data/ml-1m --backbone models/Llama-3.2-1B-Instruct --out runs/ml-1m \\
        --scale paper --experiments all --dry-run
    # the run (resumable: the same command with --resume continues it, or adds experiments)
    patchrec reproduce --data data/ml-1m --backbone models/Llama-3.2-1B-Instruct --out runs/ml-1m \\
        --scale paper --experiments all --resume

The dataset's released settings come from ``--preset``, or are inferred from the data (a release with the
users, items and interactions of ML-100K, ML-1M or Goodreads); any other data needs ``--preset``. Writes
summary.json, summary.md and summary.png into --out (every stage's run and every evaluation's results file
underneath); ``--dry-run`` writes dry_run.json and dry_run.md instead.
"""

from __future__ import annotations

import argparse
import json

from patchrec.commands.options import add_run_flags


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from patchrec.experiments.reproduce_settings import EXPERIMENTS, RELEASES, SCALES

    parser = subparsers.add_parser(
        "reproduce",
        help="the paper's experiments (tables 2-4, dropout ablation, long histories) on one backbone",
        description=__doc__ + "\nScales:\n" + "\n".join(f"  {k}: {v.why}" for k, v in SCALES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("data and model")
    what.add_argument("--data", required=True, help="release directory, e.g. data/ml-1m")
    what.add_argument("--backbone", required=True, help="Llama checkpoint: HF directory or .gguf file")
    what.add_argument("--preset", choices=sorted(RELEASES), default=None,
                      help="whose released settings (lr, G, batch) to use (default: inferred from the data; "
                           "an unknown dataset is an error)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="what to run (default cpu)")
    run.add_argument("--experiments", default="table2",
                     help=f"comma list of {', '.join(EXPERIMENTS)}, or all (default table2)")
    run.add_argument("--seed", type=int, default=None,
                     help="seed of subsets, data order and plans (default: 42 at --scale paper, the authors' "
                          "seed value; 0 at --scale cpu)")
    run.add_argument("--resume", action="store_true", help="continue a run in --out (or add experiments)")
    run.add_argument("--dry-run", action="store_true",
                     help="print every stage and row with samples, steps, estimated positions and GPU hours; "
                          "train nothing")
    run.add_argument("--authors-code", action="store_true",
                     help="pre-train as the released pt.py does: it never compresses (p = 0), each sample "
                          "twice as text; default: the paper's p = step / total steps")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--protocol", choices=("authors", "clean"), default="authors",
                    help="beam protocol (default authors: comparable with the paper)")
    ev.add_argument("--no-exact", action="store_true",
                    help="beam ranking only (the paper's protocol): --scale paper also ranks every title "
                         "exactly, most of its evaluation cost")
    ev.add_argument("--eval-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="weights dtype when ranking (default auto: bf16 on CUDA, fp32 on CPU)")
    ev.add_argument("--device", default="auto", help="torch device for training and ranking (default auto)")
    ck = parser.add_argument_group("checkpoints and estimates")
    ck.add_argument("--checkpoints-per-stage", type=int, default=10,
                    help="checkpoints per training stage, every 1/N of its steps (default 10; 0 = none); "
                         "the newest 2 are kept and all are deleted once the stage is done")
    ck.add_argument("--assume-train-tflops", type=float, default=None,
                    help="dry run: sustained training TFLOP/s per GPU the GPU hours assume (default 400)")
    ck.add_argument("--assume-eval-tflops", type=float, default=None,
                    help="dry run: sustained ranking TFLOP/s per GPU the GPU hours assume (default 100)")
    add_run_flags(ck)
    parser.set_defaults(run=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    from patchrec.experiments.reproduce import Reproduction
    from patchrec.experiments.reproduce_estimate import Throughput
    from patchrec.experiments.reproduce_report import dry_run_table, summary_table
    from patchrec.experiments.reproduce_settings import parse_experiments

    seed = args.seed if args.seed is not None else (42 if args.scale == "paper" else 0)
    job = Reproduction(args.data, args.backbone, args.out, args.scale, preset=args.preset,
                       exact=False if args.no_exact else None,
                       experiments=parse_experiments(args.experiments), resume=args.resume,
                       protocol=args.protocol, eval_dtype=args.eval_dtype, device=args.device,
                       authors_code=args.authors_code, checkpoints_per_stage=args.checkpoints_per_stage,
                       progress=not args.no_progress, seed=seed)  # fmt: skip
    assumed = args.assume_train_tflops is not None or args.assume_eval_tflops is not None
    if assumed and not args.dry_run:
        raise ValueError("--assume-train-tflops / --assume-eval-tflops only apply with --dry-run")
    if args.dry_run:
        defaults = Throughput()
        throughput = Throughput(
            defaults.train_tflops if args.assume_train_tflops is None else args.assume_train_tflops,
            defaults.eval_tflops if args.assume_eval_tflops is None else args.assume_eval_tflops)
        print(dry_run_table(job.dry_run(throughput)))
        print(f"wrote {job.out / 'dry_run.json'}, dry_run.md")
        return 0
    job.run()
    print(summary_table(json.loads((job.out / "summary.json").read_text())))
    print(f"wrote {job.out / 'summary.json'}, summary.md, summary.png")
    return 0
