"""``patchrec eval``: whole-catalog evaluation of a Llama checkpoint on the packed path (docs/method.md §5).

Example::

    patchrec eval --model runs/pft-s --data data/ml-100k --split test \\
        --out runs/pft-s/test_exact.json     # plan, K, G, L: runs/pft-s/train_config.json's

``--ranking exact`` (default) scores every distinct title by its log-likelihood as the answer (full ranks);
``--ranking beam`` is trie-constrained diverse beam search (rank >= beams counts as a miss), ``--protocol
authors`` (default: transformers 4.46.3 group beam search as the PatchRec authors call it, their rank rule)
or ``--protocol clean`` (see ``patchrec.eval.beam``).

``--model`` is a model directory, a checkpoint ``R/checkpoints/step-N`` or a training run directory ``R``
(its ``R/model``); a LoRA adapter directory (``--save adapter``, a LoRA run's checkpoints) loads its base
model from where training read it, then the adapter, merged. When the run's ``train_config.json`` is
found (in the model directory, its parent, or two levels up for a checkpoint), ``--plan``, ``--k``, ``--g``
and ``--max-items`` default to how the model was trained: the plan is the run's ``val_plan``, else its
stage when that is vanilla / pft-i / pft-s, else pft-i. A flag that contradicts the saved value is an error
unless ``--force``. Without the file the defaults are vanilla, 5, 5, 100. The results JSON records where
each value came from.

``--plan persrec`` (a ``--stage persrec`` run; its ``--persrec-*`` options also default to the run's):
``--persrec-cache on`` (default) builds each user's state (prefix + personalization tokens, per layer) from
the old segments once and ranks from the recent block against it; ``off`` runs the whole prompt. The scores
are the same; the results record the mode and the state's bytes per sample.

Writes ``patchrec.eval.metrics.write_results`` JSON (metrics, K list, masking flag, ranking, plan, raw ranks).

Several GPUs or machines: ``torchrun --nproc-per-node N -m patchrec eval ...`` gives each rank a full copy of
the model and a contiguous shard of the samples; rank 0 gathers the ranks (in sample order) and writes the
one results file, the same as a single process would (up to float rounding in scores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from patchrec.batching.plan import evaluation_plan
from patchrec.commands.options import add_persrec_flags
from patchrec.data.source import load_data
from patchrec.eval.metrics import DEFAULT_KS

PLANS = ("vanilla", "pft-i", "pft-s", "persrec")
# train_config.json fields (same names as the flags) that default to the run's; the plan is derived from two.
PERSREC_OPTIONS = ("persrec_tokens", "persrec_segment", "persrec_old", "persrec_layout", "persrec_window",
                   "persrec_recent")  # fmt: skip
SAVED_FIELDS = ("k", "g", "max_items", *PERSREC_OPTIONS)
FALLBACK = {"plan": "vanilla", "k": 5, "g": 5, "max_items": 100, "persrec_tokens": 4, "persrec_segment": 20,
            "persrec_old": "item", "persrec_layout": "segments", "persrec_window": 0,
            "persrec_recent": 0}  # without a train_config.json  # fmt: skip
PERSREC_FLAGS = (*PERSREC_OPTIONS, "persrec_cache")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="rank the whole catalog with an LLM checkpoint (exact log-likelihood or constrained beam)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="model directory, checkpoint R/checkpoints/step-N, or training run directory R")
    model.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the model directory)"
    )
    data = parser.add_argument_group("data and plan")
    data.add_argument("--data", required=True, help="release directory or 'synthetic'")
    data.add_argument("--split", choices=("val", "test"), default="test", help="split (default test)")
    data.add_argument("--max-items", type=int, default=None,
                      help="history length L (default: the run's train_config.json, else 100)")
    data.add_argument("--plan", choices=PLANS, default=None,
                      help="compression (default: the run's val_plan / stage, else vanilla)")
    data.add_argument("--k", type=int, default=None,
                      help="pft-i: newest items kept as text (default: the run's, else 5)")
    data.add_argument("--g", type=int, default=None, help="pft-s: session size (default: the run's, else 5)")
    add_persrec_flags(data, {
        "--persrec-tokens": "persrec: personalization tokens per old segment (default: the run's, else 4)",
        "--persrec-segment": "persrec: items per old segment (default: the run's, else 20)",
        "--persrec-layout": "persrec: the layout (default: the run's, else segments)",
        "--persrec-window": "persrec window layout: P (the run's)",
        "--persrec-recent": "persrec window layout: R (the run's)",
        "--persrec-old": "persrec: old items as item patches or text (default: the run's, else item)",
        "--persrec-cache": "persrec: on = build each user's state (prefix + T tokens) from the old segments "
                           "once, then rank from the recent block against it; off = the whole prompt at "
                           "once (same scores; default on)",
    })  # fmt: skip
    data.add_argument("--force", action="store_true",
                      help="allow --plan/--k/--g/--max-items that contradict the run's train_config.json")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--ranking", choices=("exact", "beam"), default="exact", help="ranking (default exact)")
    ev.add_argument("--protocol", choices=("authors", "clean"), default="authors",
                    help="beam: the authors' (transformers 4.46.3 as they call it; default) or clean")
    ev.add_argument(
        "--mask-history",
        action="store_true",
        help="mask the user's earlier items (RecBole style); default unmasked (the authors')",
    )
    ev.add_argument("--beams", type=int, default=20, help="beam: returned titles / beams (default 20)")
    ev.add_argument("--groups", type=int, default=20, help="beam: diverse groups (default 20)")
    ev.add_argument("--diversity", type=float, default=0.8, help="beam: Hamming penalty (default 0.8)")
    ev.add_argument("--max-rows", type=int, default=8192, help="rows per forward pass (default 8192)")
    ev.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")  # fmt: skip
    ev.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--out", required=True, help="results JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--dist-timeout", type=float, default=1800.0,
                    help="under torchrun: seconds a collective may wait before the job fails (default 1800)")
    parser.set_defaults(run=run)
    return parser


def resolve_model_path(model: str) -> Path:
    """``--model`` -> the directory (or file) to load: a run directory ``R`` means ``R/model``."""
    from patchrec.model.lora import is_adapter_dir  # heavy (torch, transformers): only when a command runs

    path = Path(model)
    is_model = lambda p: (p / "config.json").is_file() or is_adapter_dir(p)  # noqa: E731
    if not is_model(path) and is_model(path / "model"):
        return path / "model"
    if (path / "train_config.json").is_file() and not is_model(path):
        raise FileNotFoundError(f"--model {model}: a training run directory without model/ "
                                "(pass one of its checkpoints/step-N)")  # fmt: skip
    return path


def find_train_config(model_dir: Path) -> Path | None:
    """The run's ``train_config.json`` for a model directory: in it, its parent (``R/model``), or two levels
    up for a checkpoint (``R/checkpoints/step-N``)."""
    places = [model_dir, model_dir.parent]
    if model_dir.parent.name == "checkpoints":
        places.append(model_dir.parent.parent)
    for place in places:
        if (place / "train_config.json").is_file():
            return place / "train_config.json"
    return None


def resolve_settings(args: argparse.Namespace, model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plan, k, g, max_items, and for the persrec plan persrec_tokens / _segment / _old) and a record of
    where each came from: the flag, the run's train_config.json (read as plain JSON), or the fallback
    defaults. A flag contradicting the saved value is a ValueError
    unless ``args.force``."""
    path = find_train_config(model_dir)
    saved_values: dict[str, Any] = {}
    if path is not None:
        saved = json.loads(path.read_text())
        saved_values["plan"] = evaluation_plan(saved.get("stage", ""), saved.get("val_plan"))
        saved_values.update({name: saved[name] for name in SAVED_FIELDS if name in saved})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in ("plan", "k", "g", "max_items", *PERSREC_OPTIONS):
        if name.startswith("persrec_") and values["plan"] != "persrec":
            continue  # the persrec options only exist for that plan
        given = getattr(args, name, None)
        if given is not None:
            if name in saved_values and given != saved_values[name] and not args.force:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {given} contradicts the run's {saved_values[name]} ({path}); "
                                 "pass --force to evaluate that way anyway")  # fmt: skip
            values[name], sources[name] = given, "flag"
        elif name in saved_values:
            values[name], sources[name] = saved_values[name], "train_config"
        else:
            values[name], sources[name] = FALLBACK[name], "default"
    record = {"train_config": str(path) if path is not None else None, "saved": saved_values,
              "sources": sources, "force": bool(args.force)}  # fmt: skip
    return values, record


def run(args: argparse.Namespace) -> int:
    import torch

    from patchrec.train.distributed import distributed, quiet_unless_main

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with distributed(args.dist_timeout, device.type) as ctx:
        if ctx.active and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        quiet_unless_main(ctx)
        return _run(args, ctx, device)


def _run(args: argparse.Namespace, ctx, device) -> int:
    import torch

    from patchrec.batching.plan import make_planner
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.dataset import make_samples
    from patchrec.eval.metrics import write_results
    from patchrec.model.lora import load_model
    from patchrec.train.distributed import evaluate_sharded

    model_dir = resolve_model_path(args.model)
    settings, origin = resolve_settings(args, model_dir)
    plan, max_items = settings["plan"], settings["max_items"]
    if plan != "persrec":
        for name in PERSREC_FLAGS:
            if getattr(args, name, None) is not None:
                raise ValueError(f"--{name.replace('_', '-')} is only for --plan persrec (plan is {plan!r})")
    persrec_cache = args.persrec_cache or "on"
    if max_items < 1:
        raise ValueError(f"--max-items must be >= 1, got {max_items}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    t0 = time.perf_counter()
    tokenizer_dir = args.tokenizer or str(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    dataset = load_data(args.data)
    persrec = {name.removeprefix("persrec_"): settings.get(name, FALLBACK[name]) for name in PERSREC_OPTIONS}
    num_persrec = persrec["tokens"] if plan == "persrec" else 0
    tokens = tokenize_dataset(tokenizer, dataset, persrec_tokens=num_persrec)
    if plan == "persrec" and persrec["layout"] == "rolling":
        max_items = int(np.diff(dataset.user_offsets).max(initial=1))  # the whole timeline
    samples = make_samples(dataset, args.split, max_items)
    if len(samples) == 0:
        raise ValueError(f"--split {args.split}: dataset {dataset.name!r} has no samples there")
    # A LoRA adapter directory loads its base, then the adapter, merged (the same scores, one matmul less).
    model = load_model(model_dir, vocab_size=tokens.vocab_size, dtype=getattr(torch, dtype_name),
                       merge=True).to(device)  # fmt: skip
    if model.lm.get_input_embeddings().num_embeddings < tokens.vocab_size:
        raise ValueError("--model's embedding table is smaller than the tokenizer's vocabulary")
    planner = make_planner(plan, k=settings["k"], g=settings["g"], **persrec)
    res = evaluate_sharded(
        model, tokens, samples, ctx, planner=planner, ranking=args.ranking, ks=DEFAULT_KS,
        mask_history=args.mask_history, max_rows=args.max_rows, limit=args.limit,
        progress=not args.no_progress, beams=args.beams, groups=args.groups, diversity=args.diversity,
        protocol=args.protocol, persrec_cache=persrec_cache,
    )  # fmt: skip
    if not ctx.is_main:
        return 0
    config = {
        "model": args.model, "model_dir": str(model_dir), "tokenizer": tokenizer_dir, "data": args.data,
        "split": args.split, "max_items": max_items, "plan": plan, "k": settings["k"], "g": settings["g"],
        "settings_from": origin, "limit": args.limit, "dtype": dtype_name, "device": str(device),
        "world_size": ctx.world_size, **res.config,
    }  # fmt: skip
    extra = {"ranking": res.ranking, "plan": plan, "eval_seconds": res.seconds,
             "seconds_per_sample": res.seconds / max(res.num_samples, 1),
             "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    write_results(
        args.out, ranks=res.ranks, mask_history=res.mask_history, split=args.split, dataset=dataset.name,
        model=args.model, config=config, ks=res.config["ks"], extra=extra,
    )  # fmt: skip
    label = "masked" if res.mask_history else "unmasked"
    per_sample = res.seconds / max(res.num_samples, 1)
    protocol = f" protocol={args.protocol}" if res.ranking == "beam" else ""
    print(f"{dataset.name} {args.split} plan={plan} ranking={res.ranking}{protocol} "
          f"({label}, n={res.num_samples}, {per_sample:.3f} s/sample)")
    if plan == "persrec":
        print(f"persrec cache {persrec_cache}: state {res.config['persrec_state_rows_mean']:.1f} rows, "
              f"{res.config['persrec_state_bytes_per_sample'] / 1024:.1f} KiB per sample")
    print("   K      HR    NDCG")
    for k in res.config["ks"]:
        print(f"{k:4d}  {res.metrics[f'HR@{k}']:.4f}  {res.metrics[f'NDCG@{k}']:.4f}")
    print(f"wrote {args.out}")
    return 0


__all__ = ["add_parser", "find_train_config", "resolve_model_path", "resolve_settings", "run"]
