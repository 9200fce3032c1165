"""``patchrec eval``: whole-catalog evaluation of a Llama checkpoint on the packed path (METHOD.md §5).

Example::

    patchrec eval --model runs/pft-s --data ../shared/data/patchrec/ml-100k --plan pft-s --g 20 \\
        --split test --out runs/pft-s/test_exact.json

``--ranking exact`` (default) scores every distinct title by its log-likelihood as the answer (full ranks);
``--ranking beam`` is the authors' trie-constrained diverse beam search (rank >= beams counts as a miss).
Writes ``patchrec.metrics.write_results`` JSON (metrics, K list, masking flag, ranking, plan, raw ranks).
"""

from __future__ import annotations

import argparse
import time

from patchrec.data.source import load_data
from patchrec.metrics import DEFAULT_KS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="rank the whole catalog with an LLM checkpoint (exact log-likelihood or constrained beam)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="Hugging Face Llama checkpoint directory")
    model.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the model directory)"
    )
    data = parser.add_argument_group("data and plan")
    data.add_argument("--data", required=True, help="release directory or 'synthetic'")
    data.add_argument("--split", choices=("val", "test"), default="test", help="split (default test)")
    data.add_argument("--max-items", type=int, default=100, help="history length L (default 100)")
    data.add_argument("--plan", choices=("vanilla", "pft-i", "pft-s"), default="vanilla", help="compression")
    data.add_argument("--k", type=int, default=5, help="pft-i: newest items kept as text (default 5)")
    data.add_argument("--g", type=int, default=5, help="pft-s: session size (default 5)")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--ranking", choices=("exact", "beam"), default="exact", help="protocol (default exact)")
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
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from patchrec.data.dataset import make_samples
    from patchrec.evaluate import evaluate
    from patchrec.metrics import write_results
    from patchrec.model import PackedLlama
    from patchrec.plan import make_planner
    from patchrec.tokens import load_tokenizer, tokenize_dataset

    if args.max_items < 1:
        raise ValueError(f"--max-items must be >= 1, got {args.max_items}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    dataset = load_data(args.data)
    tokens = tokenize_dataset(tokenizer, dataset)
    samples = make_samples(dataset, args.split, args.max_items)
    if len(samples) == 0:
        raise ValueError(f"--split {args.split}: dataset {dataset.name!r} has no samples there")
    model = PackedLlama.from_pretrained(args.model, vocab_size=tokens.vocab_size,
                                        dtype=getattr(torch, dtype_name)).to(device)  # fmt: skip
    if model.lm.get_input_embeddings().num_embeddings < tokens.vocab_size:
        raise ValueError("--model's embedding table is smaller than the tokenizer's vocabulary")
    planner = make_planner(args.plan, k=args.k, g=args.g)
    res = evaluate(
        model, tokens, samples, planner=planner, ranking=args.ranking, ks=DEFAULT_KS,
        mask_history=args.mask_history, max_rows=args.max_rows, limit=args.limit,
        progress=not args.no_progress, beams=args.beams, groups=args.groups, diversity=args.diversity,
    )  # fmt: skip
    config = {
        "model": args.model, "tokenizer": args.tokenizer or args.model, "data": args.data,
        "split": args.split, "max_items": args.max_items, "plan": args.plan, "k": args.k, "g": args.g,
        "limit": args.limit, "dtype": dtype_name, "device": str(device), **res.config,
    }  # fmt: skip
    extra = {"ranking": res.ranking, "plan": args.plan, "eval_seconds": res.seconds,
             "seconds_per_sample": res.seconds / max(res.num_samples, 1),
             "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    write_results(
        args.out, ranks=res.ranks, mask_history=res.mask_history, split=args.split, dataset=dataset.name,
        model=args.model, config=config, ks=res.config["ks"], extra=extra,
    )  # fmt: skip
    label = "masked" if res.mask_history else "unmasked"
    per_sample = res.seconds / max(res.num_samples, 1)
    print(f"{dataset.name} {args.split} plan={args.plan} ranking={res.ranking} "
          f"({label}, n={res.num_samples}, {per_sample:.3f} s/sample)")
    print("   K      HR    NDCG")
    for k in res.config["ks"]:
        print(f"{k:4d}  {res.metrics[f'HR@{k}']:.4f}  {res.metrics[f'NDCG@{k}']:.4f}")
    print(f"wrote {args.out}")
    return 0


__all__ = ["add_parser", "run"]
