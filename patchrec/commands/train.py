"""``patchrec train``: one training stage on the packed path (patch pre-training, PFT-I, PFT-S, vanilla SFT,
dropout ablation).

Two-stage example (docs/method.md §3)::

    patchrec train --stage pretrain --data data/ml-100k \\
        --tokenizer path/to/llama3 --init tiny --preset tiny --out runs/ml100k-pretrain
    patchrec train --stage pft-i --data data/ml-100k \\
        --init runs/ml100k-pretrain --preset tiny --out runs/ml100k-pft-i

``--init`` is a model preset (random init), a Hugging Face model directory, a ``.gguf`` file (its tokenizer
and chat template too), or a previous run's ``--out`` (its ``model/``; the tokenizer saved there is used when
``--tokenizer`` is absent). An optimizer step is ``--batch-size`` samples for every plan, packed into
micro-batches of ``--max-rows`` rows; weights and optimizer state are fp32 (``--dtype`` only sets compute).
``--resume`` continues from the newest checkpoint in ``--out`` and reproduces the uninterrupted run. Writes
``train_config.json``, ``log.jsonl``, ``checkpoints/`` and the final ``model/`` (model + tokenizer) into
``--out``.

LoRA (``pip install 'patchrec[peft]'``): ``--lora-r 16`` trains adapters on every attention and MLP
projection instead of all weights; ``--train-embeddings new`` (default) also trains the embedding rows
patchrec adds (history markers, PerSRec tokens), ``none`` freezes the table, ``all`` trains it. Checkpoints
are adapter directories (LoRA weights, the embedding rows that differ from the base, and the base's path);
the final ``model/`` is merged into plain weights (``--save merged``, default) or an adapter directory
(``--save adapter``). ``patchrec eval --model`` loads either.

Several GPUs or machines: launch the same command with ``torchrun`` (``torchrun --nproc-per-node 8 -m
patchrec train ...``; add ``--nnodes`` and a rendezvous for several machines). ``--parallel ddp`` (default)
keeps a replica per GPU, ``--parallel fsdp`` shards weights, gradients and AdamW state (FSDP2). A step is
still ``--batch-size`` samples in total, split over the ranks by packed rows, so the losses do not depend
on the number of processes and ``--resume`` works on any number of them. ``--out`` must be on a filesystem
every machine sees.
"""

from __future__ import annotations

import argparse

from patchrec.commands.options import add_persrec_flags, add_run_flags
from patchrec.train.config import PERSREC_FIELDS, PRESETS, STAGES, TrainConfig

# argparse dest -> TrainConfig field, for flags whose default (None) means "the preset's / config's value"
_OVERRIDES = ("k", "g", "p", *PERSREC_FIELDS,
              "init", "lora_r", "lora_alpha", "lora_targets", "train_embeddings", "save",
              "tokenizer", "tokenizer_vocab", "max_items", "train_samples",
              "synthetic_users", "synthetic_items", "synthetic_length", "synthetic_topics",
              "synthetic_interests", "synthetic_long_term_share", "lr", "adamw",
              "weight_decay", "warmup_ratio", "grad_clip", "epochs", "max_steps", "batch_size", "max_rows",
              "seed", "val_every", "val_samples", "val_plan", "log_every", "save_every", "keep_checkpoints",
              "halt_after", "dtype", "device", "save_dtype", "parallel", "dist_timeout")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train one stage (pretrain, pft-i, pft-s, vanilla, dropout, persrec) on the packed path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _stage_flags(parser.add_argument_group("stage and model"))
    _lora_flags(parser.add_argument_group("LoRA (needs peft: pip install 'patchrec[peft]')"))
    _data_flags(parser.add_argument_group("data"))
    _optimisation_flags(parser.add_argument_group("optimisation"))
    _run_flags(parser.add_argument_group("validation, logging, checkpoints, hardware"))
    dist = parser.add_argument_group("several processes (under torchrun)")
    dist.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default=None,
                      help="ddp (auto: a full replica per rank) or fsdp (FSDP2: weights, gradients and "
                           "AdamW state sharded per decoder layer); ignored by a single process")
    dist.add_argument("--dist-timeout", type=float, default=None,
                      help="seconds a collective may wait before the job fails (default 1800)")
    parser.set_defaults(run=run_command)
    return parser


def _stage_flags(what: argparse._ArgumentGroup) -> None:
    what.add_argument("--stage", required=True, choices=STAGES, help="plan trained in this stage")
    what.add_argument("--init", default=None,
                      help="model preset (tiny, llama-3.2-1b: random init), HF model dir, .gguf file, or a "
                           "previous run dir")
    what.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="hyperparameter preset (docs/method.md §3 released settings, or tiny for CPU)")
    what.add_argument("--k", type=int, default=None, help="pft-i: newest items kept as text (default 5)")
    what.add_argument("--g", type=int, default=None, help="pft-s: session size (default 5; ml-100k 20)")
    what.add_argument("--p", type=float, default=None,
                      help="pretrain/dropout probability (default: linear curriculum 0 -> 1)")
    add_persrec_flags(what, {
        "--persrec-tokens": "persrec: personalization tokens after each old segment (default 4)",
        "--persrec-segment": "persrec: items per old-history segment, from the oldest (default 20)",
        "--persrec-old": "persrec: old items as item patches (default) or text",
        "--persrec-layout": "persrec: segments (default), window (one old window of P items, then R recent) "
                            "or rolling (a k-vector memory over the whole timeline)",
        "--persrec-window": "persrec window layout: P",
        "--persrec-recent": "persrec window layout: R",
        "--persrec-unroll": "persrec rolling layout: cut the memory's gradient every U segments (0: never)",
    })  # fmt: skip


def _lora_flags(lora: argparse._ArgumentGroup) -> None:
    lora.add_argument("--lora-r", type=int, default=None,
                      help="LoRA rank on the decoder's linear layers; 0 (default) = full fine-tuning")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="LoRA scale alpha: updates are alpha/r B A (default 2 r)")
    lora.add_argument("--lora-targets", nargs="+", default=None, metavar="MODULE",
                      help="modules that get adapters (default: q_proj k_proj v_proj o_proj gate_proj "
                           "up_proj down_proj)")
    lora.add_argument("--train-embeddings", choices=("none", "new", "all"), default=None,
                      help="with LoRA, the embedding table: frozen, only the rows patchrec adds (markers, "
                           "PerSRec tokens; default) or all rows")
    lora.add_argument("--save", choices=("merged", "adapter"), default=None,
                      help="with LoRA, the final model/: adapters merged into plain weights (default) or the "
                           "adapter directory (needs the base model where it was); checkpoints are adapters")


def _data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument("--data", required=True, help="release directory or 'synthetic'")
    data.add_argument("--tokenizer", default=None,
                      help="HF tokenizer dir (default: the init model's; random init: a BPE on the titles)")
    data.add_argument("--tokenizer-vocab", type=int, default=None, help="vocabulary of that BPE (1000)")
    data.add_argument("--max-items", type=int, default=None, help="history length L (default 100)")
    data.add_argument("--train-samples", type=int, default=None,
                      help="train on a seeded random subset of this many samples (default 0 = all)")
    data.add_argument("--synthetic-users", type=int, default=None, help="--data synthetic: users (1000)")
    data.add_argument("--synthetic-items", type=int, default=None, help="--data synthetic: items (200)")
    data.add_argument("--synthetic-length", type=float, default=None,
                      help="--data synthetic: mean items per user (40)")
    data.add_argument("--synthetic-topics", type=int, default=None, help="--data synthetic: topics (10)")
    data.add_argument("--synthetic-interests", type=int, default=None,
                      help="--data synthetic: long-lived topics per user (3)")
    data.add_argument("--synthetic-long-term-share", type=float, default=None,
                      help="--data synthetic: share of items from those topics (0.6)")
    data.add_argument("--out", required=True, help="output directory")
    data.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def _optimisation_flags(opt: argparse._ArgumentGroup) -> None:
    opt.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    opt.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    opt.add_argument("--warmup-ratio", type=float, default=None, help="linear warmup share (default 0.05)")
    opt.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (default 0.3; 0 = off)")
    opt.add_argument("--adamw", choices=("foreach", "fused"), default=None,
                     help="AdamW implementation: foreach (default; bitwise torch's per-tensor loop) or fused "
                     "(one kernel per tensor: faster, rounds about 1 ulp differently)")
    opt.add_argument("--epochs", type=int, default=None, help="epochs (default 1)")
    opt.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="samples per optimizer step, the same for every plan (default 64)")
    opt.add_argument("--max-rows", type=int, default=None,
                     help="packed rows per micro-batch (memory only: a step's samples are accumulated)")
    opt.add_argument("--seed", type=int, default=None, help="seed for init, data order and random plans")


def _run_flags(run: argparse._ArgumentGroup) -> None:
    run.add_argument("--val-every", type=int, default=None, help="steps between validations (0 = never)")
    run.add_argument("--val-samples", type=int, default=None, help="validation subset size (default 256)")
    run.add_argument("--val-plan", choices=("vanilla", "pft-i", "pft-s"), default=None,
                     help="plan used for validation (default: the stage's; pft-i for pretrain/dropout)")
    run.add_argument("--log-every", type=int, default=None, help="steps between log.jsonl lines")
    run.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (0 = end only)")
    run.add_argument("--keep-checkpoints", type=int, default=None, help="checkpoints kept (default 2)")
    run.add_argument("--halt-after", type=int, default=None,
                     help="stop with a checkpoint after this step, schedule unchanged (resume later)")
    run.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=None,
                     help="compute (autocast): auto = bf16 on CUDA, fp32 on CPU; weights stay fp32")
    run.add_argument("--save-dtype", choices=("fp32", "bf16"), default=None,
                     help="dtype of the final saved model (default fp32; checkpoints are always fp32)")
    run.add_argument("--device", default=None, help="cuda, cpu or auto (default)")
    add_run_flags(run, threads=None, progress="no tqdm progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.stage != "persrec":
        for name in PERSREC_FIELDS:
            if getattr(args, name) is not None:
                raise ValueError(f"{PERSREC_FIELDS[name][0]} is only for --stage persrec")
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values |= {"stage": args.stage, "data": args.data, "out": args.out, "progress": not args.no_progress}
    values |= {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    if args.persrec_layout == "window" and args.max_items is None and None not in (
        args.persrec_window, args.persrec_recent
    ):  # the window layout reads P + R items
        values["max_items"] = args.persrec_window + args.persrec_recent
    return TrainConfig(**values)


def run_command(args: argparse.Namespace) -> int:
    from patchrec.train.loop import train

    config = config_from_args(args)
    result = train(config, resume=args.resume)
    if result.rank != 0:  # under torchrun only rank 0 reports
        return 0
    done = "finished" if result.model_dir is not None else "halted (resume with --resume)"
    ranks = f" on {result.world_size} ranks" if result.world_size > 1 else ""
    print(f"{done} at step {result.step}/{result.total_steps}{ranks}: loss {result.final_loss:.4f}, "
          f"{result.rows_per_s:.0f} rows/s, {result.samples_per_s:.1f} sequences/s")
    if result.val_metrics:
        last = result.val_metrics[-1]
        print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in last.items() if "@" in k))
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
    return 0


run = run_command
