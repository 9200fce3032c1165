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
import time
from pathlib import Path
from typing import Any

import numpy as np

from patchrec.data.source import load_data

MODELS = ("sasrec", "hstu", "gru4rec", "popularity")
# Adam learning rate when --lr is not given. GRU4Rec stalled at popularity level with 1e-3 on ML-100K
# (test HR@20 0.065 vs 0.148 with 5e-3, same seed); its paper trained with a large Adagrad rate (0.01).
DEFAULT_LR = {"sasrec": 1e-3, "hstu": 1e-3, "gru4rec": 5e-3}
ATTENTION_MODELS = ("sasrec", "hstu")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "baseline",
        help="train and evaluate an ID baseline (popularity, SASRec, HSTU, GRU4Rec), whole-catalog ranking",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=MODELS, help="which baseline")
    data = parser.add_argument_group("data and evaluation")
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

    train = parser.add_argument_group("training (sasrec, gru4rec)")
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

    model = parser.add_argument_group("model (defaults: SASRecConfig / HSTUConfig / GRU4RecConfig)")
    model.add_argument("--hidden", type=int, default=None, help="SASRec/HSTU width (64) / GRU units (100)")
    model.add_argument("--dropout", type=float, default=None, help="dropout (SASRec/HSTU 0.2, GRU4Rec 0.25)")
    model.add_argument("--num-blocks", type=int, default=None, help="SASRec/HSTU attention blocks (2)")
    model.add_argument("--num-heads", type=int, default=None, help="SASRec/HSTU attention heads (1)")
    model.add_argument("--embedding", type=int, default=None, help="GRU4Rec item embedding size (64)")
    model.add_argument("--num-layers", type=int, default=None, help="GRU4Rec GRU layers (1)")

    persrec = parser.add_argument_group("PerSRec (sasrec, hstu; docs/method.md §6)")
    persrec.add_argument(
        "--persrec-tokens", type=int, default=None, help="K learnable tokens after each old segment (0 = off)"
    )
    persrec.add_argument("--persrec-segment", type=int, default=None,
                         help="segments / rolling layouts: items per segment (50)")  # fmt: skip
    persrec.add_argument("--persrec-layout", choices=("segments", "window", "rolling"), default=None,
                         help="where the tokens go (segments, the default; window; rolling)")  # fmt: skip
    persrec.add_argument("--persrec-window", type=int, default=None,
                         help="window layout: P old items compressed into the tokens")  # fmt: skip
    persrec.add_argument("--persrec-recent", type=int, default=None,
                         help="window layout: R newest items read as they are")  # fmt: skip
    persrec.add_argument("--persrec-unroll", type=int, default=None,
                         help="rolling layout, training: cut the gradient every U segments (0: never)")
    persrec.add_argument(
        "--persrec-cache",
        choices=("on", "off"),
        default=None,
        help="rank from the cached per-user state (on, default) or the whole history (off)",
    )
    persrec.add_argument(
        "--latency-samples",
        type=int,
        default=0,
        help="time per-user inference (batch 1) on this many evaluation samples (default 0 = skip)",
    )

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def _override(config: Any, args: argparse.Namespace, names: dict[str, str]) -> Any:
    """``config`` with the fields ``names[field] = arg`` replaced where the flag was given."""
    given = {f: getattr(args, a) for f, a in names.items() if getattr(args, a) is not None}
    return dataclasses.replace(config, **given)


def _ignored(args: argparse.Namespace, flags: list[str]) -> None:
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply to {args.model}")


def history_items(args: argparse.Namespace, dataset) -> int:
    """Items of history every sample reads: ``--max-items`` (default 100); the PerSRec window layout reads
    P + R, the rolling layout the whole timeline (the longest user's length)."""
    layout = args.persrec_layout or "segments"
    if layout == "window":
        if args.persrec_window is None or args.persrec_recent is None:
            raise ValueError("--persrec-layout window needs --persrec-window P and --persrec-recent R")
        window = args.persrec_window + args.persrec_recent
        if args.max_items not in (None, window):
            raise ValueError(f"--max-items must be P + R = {window} for the window layout, or left out")
        return window
    if args.persrec_window is not None or args.persrec_recent is not None:
        raise ValueError("--persrec-window and --persrec-recent apply to --persrec-layout window")
    if layout != "rolling" and args.persrec_unroll is not None:
        raise ValueError("--persrec-unroll applies to --persrec-layout rolling")
    if layout == "rolling":
        if args.max_items is not None:
            raise ValueError("--persrec-layout rolling reads the whole timeline: leave --max-items out")
        return int(np.diff(dataset.user_offsets).max())
    max_items = 100 if args.max_items is None else args.max_items
    if max_items < 1:
        raise ValueError(f"--max-items must be >= 1, got {max_items}")
    return max_items


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import set_seed

    from patchrec.baselines import GRU4Rec, GRU4RecConfig, Popularity, SASRec, SASRecConfig, TrainConfig
    from patchrec.baselines.checkpoint import save_baseline
    from patchrec.baselines.train import evaluate, fit
    from patchrec.data.dataset import make_samples
    from patchrec.eval.metrics import format_metrics, rank_samples, write_results

    out = Path(args.out)
    progress = not args.no_progress
    t0 = time.perf_counter()
    dataset = load_data(args.data)
    args.max_items = history_items(args, dataset)
    samples = make_samples(dataset, args.split, args.max_items)
    if len(samples) == 0:
        raise ValueError(f"--split {args.split}: dataset {dataset.name!r} has no samples there")
    set_seed(args.seed)

    train_flags = ["epochs", "batch_size", "lr", "weight_decay", "patience", "eval_every", "max_minutes"]
    config: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "max_items": args.max_items,
        "split": args.split,
        "mask_history": args.mask_history,  # also decides the validation metric used for model selection
        "ties": args.ties,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    extra: dict[str, Any] = {}
    model = None
    persrec_flags = ["persrec_tokens", "persrec_segment", "persrec_cache", "persrec_layout", "persrec_window",
                     "persrec_recent", "persrec_unroll"]  # fmt: skip
    if args.model not in ATTENTION_MODELS:
        _ignored(args, persrec_flags)
        if args.latency_samples:
            raise ValueError(f"--latency-samples applies to {', '.join(ATTENTION_MODELS)}, not {args.model}")
    if args.latency_samples < 0:
        raise ValueError(f"--latency-samples must be >= 0, got {args.latency_samples}")
    if args.model == "popularity":
        _ignored(
            args, train_flags + ["hidden", "dropout", "num_blocks", "num_heads", "embedding", "num_layers"]
        )
        pop = Popularity.fit(dataset)

        def ranks_for(mask: bool):
            return rank_samples(
                pop.scorer(samples),
                samples,
                mask_history=mask,
                ties=args.ties,
                progress=progress,
                desc=f"eval {args.split}",
            )
    else:
        if args.model in ATTENTION_MODELS:
            _ignored(args, ["embedding", "num_layers"])
            needs_tokens = [f for f in persrec_flags[1:] if getattr(args, f) is not None]
            if not args.persrec_tokens and needs_tokens:
                flags = ", ".join(f"--{f.replace('_', '-')}" for f in needs_tokens)
                raise ValueError(f"{flags} need(s) --persrec-tokens >= 1")
            names = ["hidden", "dropout", "num_blocks", "num_heads"] + persrec_flags[:2] + persrec_flags[3:]
            if args.model == "sasrec":
                model_config = _override(SASRecConfig(max_len=args.max_items), args, {n: n for n in names})
                model = SASRec(dataset.num_items, model_config)
            else:
                from patchrec.baselines.hstu import HSTU, HSTUConfig

                model_config = _override(HSTUConfig(max_len=args.max_items), args, {n: n for n in names})
                model = HSTU(dataset.num_items, model_config)
            persrec_cache = bool(model_config.persrec_tokens) and args.persrec_cache != "off"
            config["persrec_cache"] = persrec_cache
        else:
            _ignored(args, ["num_blocks", "num_heads"])
            model_config = _override(
                GRU4RecConfig(),
                args,
                {
                    "hidden": "hidden",
                    "dropout": "dropout",
                    "embedding": "embedding",
                    "num_layers": "num_layers",
                },
            )
            model = GRU4Rec(dataset.num_items, model_config)
            persrec_cache = False
        base = TrainConfig(seed=args.seed, lr=DEFAULT_LR[args.model])
        train_config = _override(base, args, {f: f for f in train_flags})
        config["model_config"] = dataclasses.asdict(model_config)
        config["train_config"] = dataclasses.asdict(train_config)
        result = fit(
            model,
            dataset,
            train_config,
            max_len=args.max_items,
            mask_history=args.mask_history,
            progress=progress,
        )
        extra["training"] = dataclasses.asdict(result)
        print(
            f"selected epoch {result.best_epoch} of {result.epochs_run} "
            f"(val NDCG@10 {result.best_val_ndcg10:.4f}, {result.seconds:.0f} s)"
        )

        def ranks_for(mask: bool):
            return evaluate(
                model,
                samples,
                mask_history=mask,
                ties=args.ties,
                batch_size=train_config.eval_batch_size,
                progress=progress,
                persrec_cache=persrec_cache,
            )

        if args.latency_samples:
            from patchrec.baselines.latency import per_user_latency

            extra["latency"] = per_user_latency(model, samples, args.latency_samples, cached=persrec_cache)
            lat = extra["latency"]
            state = f", state {lat['state_bytes_mean'] / 1024:.1f} KiB/user" if persrec_cache else ""
            print(f"inference: {lat['ms_per_user_median']:.2f} ms/user (median, batch 1){state}")

    config["num_items"] = dataset.num_items
    save_baseline(model if model is not None else pop, config, out)
    masks = [args.mask_history, not args.mask_history] if args.both_masks else [args.mask_history]
    for mask in masks:
        ranks = ranks_for(mask)
        extra["wall_seconds"] = time.perf_counter() - t0
        common = dict(
            ranks=ranks,
            mask_history=mask,
            split=args.split,
            dataset=dataset.name,
            model=args.model,
            config=config,
            ties=args.ties,
            extra=extra,
        )
        if mask == args.mask_history:
            written = write_results(out / "results.json", **common)
        if args.both_masks:
            written = write_results(out / f"results_{'masked' if mask else 'unmasked'}.json", **common)
        label = "masked" if mask else "unmasked"
        print(
            f"{args.model} {dataset.name} {args.split} ({label}, n={len(ranks)}): "
            f"{format_metrics(written['metrics'])}"
        )
    print(f"wrote {out / 'results.json'}")
    return 0
