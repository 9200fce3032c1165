"""``patchrec baseline``: train and evaluate an ID-based baseline (popularity, SASRec, HSTU, GRU4Rec).

Example::

    patchrec baseline sasrec --data data/ml-100k --split test --out runs/sasrec-ml100k
    patchrec baseline hstu --data data/ml-1m --max-items 200 \
        --persrec-tokens 4 --persrec-segment 50 --out runs/hstu-persrec-ml1m

PerSRec (``--persrec-tokens K``, SASRec and HSTU) in one of three layouts (``--persrec-layout``):

- ``segments`` (default): the latest ``--max-items`` items cut into old segments of ``--persrec-segment``
  items, each followed by K tokens; the state grows by K rows per segment;
- ``window`` (the PerSRec paper): one old window of ``--persrec-window`` P items compressed into K tokens,
  then the ``--persrec-recent`` R newest items; reads the newest P + R items (``--max-items`` defaults to it);
- ``rolling`` (bounded state): the user's whole timeline in segments of ``--persrec-segment`` items from
  their first interaction, a K-vector memory carried from segment to segment; reads every item of the
  history (``--max-items`` does not apply); ``--persrec-unroll U`` cuts the training gradient every U
  segments.

``--persrec-cache on`` (the default) ranks from each user's cached state (built once from the old history)
and the recent items only, ``off`` runs the whole history; both give the same ranks. ``--latency-samples N``
times per-user inference (batch 1) on N seeded evaluation samples and records it with the state size.

Writes ``results.json`` (``patchrec.eval.metrics.write_results``: metrics, K list, masking flag, tie rule,
split, dataset, model, config, raw ranks) and ``config.json`` (the resolved configuration) into ``--out``; the
model to ``model.safetensors`` (the selected weights; popularity: its counts), which
``patchrec.baselines.checkpoint.load_baseline`` (and ``patchrec serve``) read back with ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses

from patchrec.commands.options import add_persrec_flags, add_run_flags, flag_values

# patchrec.baselines.run.MODELS, written out so that `patchrec --help` does not import torch (checked equal by
# tests/test_baselines.py).
MODELS = ("sasrec", "hstu", "gru4rec", "popularity")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "baseline",
        help="train and evaluate an ID baseline (popularity, SASRec, HSTU, GRU4Rec), whole-catalog ranking",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=MODELS, help="which baseline")
    _data_flags(parser.add_argument_group("data and evaluation"))
    _train_flags(parser.add_argument_group("training (sasrec, gru4rec)"))
    _model_flags(parser.add_argument_group("model (defaults: SASRecConfig / HSTUConfig / GRU4RecConfig)"))
    persrec = parser.add_argument_group("PerSRec (sasrec, hstu; docs/method.md §6)")
    add_persrec_flags(persrec, {
        "--persrec-tokens": "K learnable tokens after each old segment (0 = off)",
        "--persrec-segment": "segments / rolling layouts: items per segment (50)",
        "--persrec-layout": "where the tokens go (segments, the default; window; rolling)",
        "--persrec-window": "window layout: P old items compressed into the tokens",
        "--persrec-recent": "window layout: R newest items read as they are",
        "--persrec-unroll": "rolling layout, training: cut the gradient every U segments (0: never)",
        "--persrec-cache": "rank from the cached per-user state (on, default) or the whole history (off)",
    })  # fmt: skip
    persrec.add_argument(
        "--latency-samples",
        type=int,
        default=0,
        help="time per-user inference (batch 1) on this many evaluation samples (default 0 = skip)",
    )
    add_run_flags(parser.add_argument_group("run"), threads="torch CPU threads (default: torch's)")
    parser.set_defaults(run=run)
    return parser


def _data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--data",
        required=True,
        help="release directory (id2title.txt, sequences.jsonl, prompt.txt) or 'synthetic'",
    )
    data.add_argument(
        "--max-items", type=int, default=None,
        help="history length L (default 100; PerSRec window: P + R; rolling: the whole timeline)",
    )  # fmt: skip
    data.add_argument(
        "--split", choices=("val", "test"), default="test", help="split to evaluate (default test)"
    )
    data.add_argument(
        "--mask-history",
        action="store_true",
        help="rank with the user's earlier items masked out (RecBole style); default unmasked (the authors')",
    )
    data.add_argument(
        "--both-masks",
        action="store_true",
        help="also write results_masked.json and results_unmasked.json from the same trained model",
    )
    data.add_argument(
        "--ties",
        choices=("pessimistic", "stable", "optimistic"),
        default="pessimistic",
        help="how equal scores rank (patchrec.eval.metrics; default pessimistic)",
    )
    data.add_argument("--out", required=True, help="output directory")


def _train_flags(train: argparse._ArgumentGroup) -> None:
    train.add_argument("--epochs", type=int, default=None, help="max epochs (default 200; early stopping)")
    train.add_argument(
        "--batch-size", type=int, default=None, help="training sequences per step (default 128)"
    )
    train.add_argument(
        "--lr", type=float, default=None, help="Adam learning rate (default: sasrec 1e-3, gru4rec 5e-3)"
    )
    train.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay (default 0)")
    train.add_argument(
        "--patience", type=int, default=None, help="evaluations without gain before stopping (10)"
    )
    train.add_argument("--eval-every", type=int, default=None, help="epochs between validations (default 1)")
    train.add_argument(
        "--max-minutes", type=float, default=None, help="training time budget in minutes (default 0 = none)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed for weights, dropout and shuffling")


def _model_flags(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--hidden", type=int, default=None, help="SASRec/HSTU width (64) / GRU units (100)")
    model.add_argument("--dropout", type=float, default=None, help="dropout (SASRec/HSTU 0.2, GRU4Rec 0.25)")
    model.add_argument("--num-blocks", type=int, default=None, help="SASRec/HSTU attention blocks (2)")
    model.add_argument("--num-heads", type=int, default=None, help="SASRec/HSTU attention heads (1)")
    model.add_argument("--embedding", type=int, default=None, help="GRU4Rec item embedding size (64)")
    model.add_argument("--num-layers", type=int, default=None, help="GRU4Rec GRU layers (1)")


def run(args: argparse.Namespace) -> int:
    from patchrec.baselines.run import BaselineRun, run_baseline

    names = [f.name for f in dataclasses.fields(BaselineRun) if f.name != "progress"]
    run_baseline(BaselineRun(**flag_values(args, names), progress=not args.no_progress))
    return 0
