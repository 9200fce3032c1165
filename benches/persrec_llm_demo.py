"""The LLM ``persrec`` plan next to PFT-I and PFT-S on the demo's synthetic data (issue 11), on CPU.

The demo's pipeline (``patchrec.experiments.demo``): synthetic data -> title BPE -> a ``tiny`` Llama trained
on catalog text (the shared backbone) -> each recommender trained from that backbone with the same optimizer
steps of the same batch size (no patch pre-training stage for any of them, so the three differ only by their
plan) -> exact whole-catalog ranking of the same test samples. PerSRec is ranked with ``--persrec-cache
on`` and ``off`` (same ranks; the timing and the state size are recorded).

    python benches/persrec_llm_demo.py --out benches/results/persrec-llm-demo

Writes ``results.json`` (with every model's per-sample ranks, PerSRec's with the cache off too, and the
ranked test samples' indices: every metric is recomputable) and ``results.md`` into ``--out`` (the work
directory with the runs is ``--work``, a temporary directory by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.synthetic import item_topics
from patchrec.experiments.demo import DemoConfig, synthetic_dataset
from patchrec.experiments.stages import (
    HistoryCost,
    catalog_backbone,
    evaluate_trained,
    ranked_test_samples,
    ranks_list,
    small_stage,
    write_workspace,
)
from patchrec.train.loop import train

KS = (10, 20)


@dataclasses.dataclass
class Setup:
    users: int = 800
    items: int = 100
    max_items: int = 30  # history length L
    k: int = 5  # pft-i: newest items as text
    g: int = 5  # pft-s: session size (newest g as text, the g before as item patches, older as sessions)
    segment: int = 5  # persrec: items per old segment (the newest 1..segment stay text, like PFT-I's k)
    tokens: int = 4  # persrec: T tokens per segment
    old: str = "item"  # persrec: old items as item patches
    catalog_steps: int = 600
    steps: int = 200
    train_samples: int = 6000
    batch_size: int = 32
    lr: float = 3e-3
    max_rows: int = 4096
    test_samples: int = 200
    seed: int = 0


def run(setup: Setup, work: Path, progress: bool) -> dict:
    demo = DemoConfig(users=setup.users, items=setup.items, max_items=setup.max_items, seed=setup.seed)
    dataset = synthetic_dataset(demo)
    write_workspace(dataset, work, demo.tokenizer_vocab)
    topic_of_item = item_topics(demo.items, demo.topics, demo.seed)
    start = time.perf_counter()
    catalog = catalog_backbone(dataset, topic_of_item, work, steps=setup.catalog_steps, lr=setup.lr,
                               seed=setup.seed)  # fmt: skip
    catalog_seconds = time.perf_counter() - start
    ranked = ranked_test_samples(dataset, setup.max_items, setup.test_samples, setup.seed)
    test = ranked.samples

    plans = {
        f"PFT-I (k={setup.k})": dict(stage="pft-i", k=setup.k),
        f"PFT-S (g={setup.g})": dict(stage="pft-s", g=setup.g),
        f"PerSRec (segment {setup.segment}, {setup.tokens} T, old {setup.old})": dict(
            stage="persrec", persrec_segment=setup.segment, persrec_tokens=setup.tokens,
            persrec_old=setup.old),
    }  # fmt: skip
    rows = []
    for name, options in plans.items():
        result = train(small_stage(
            work, work / options["stage"], init=str(catalog.model_dir), tokenizer=str(work / "tokenizer"),
            max_items=setup.max_items, train_samples=setup.train_samples, lr=setup.lr, steps=setup.steps,
            batch_size=setup.batch_size, max_rows=setup.max_rows, seed=setup.seed, log_every=10,
            progress=progress, **options,
        ))  # fmt: skip
        rows.append(evaluate_row(name, options, setup, result, dataset, test, progress))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("ranks")}), flush=True)
    return {"setup": dataclasses.asdict(setup), "test_samples": len(test), "ranking": "exact",
            "mask_history": False, "ks": list(KS), "ranked_samples": ranked.record(),
            "catalog_text_seconds": catalog_seconds, "threads": torch.get_num_threads(),
            "rows": rows}  # fmt: skip


def evaluate_row(name: str, options: dict, setup: Setup, result, dataset, test, progress: bool) -> dict:
    """One trained model ranked exactly (PerSRec: with its cache on and off), with its per-sample ranks."""
    persrec = options["stage"] == "persrec"
    tokens = tokenize_dataset(load_tokenizer(result.model_dir), dataset,
                              persrec_tokens=setup.tokens if persrec else 0)  # fmt: skip
    planner = make_planner(options["stage"], k=setup.k, g=setup.g, segment=setup.segment,
                           tokens=setup.tokens, old=setup.old)  # fmt: skip
    evals = {cache: evaluate_trained(result.model_dir, tokens, test, planner, ks=KS, progress=progress,
                                     persrec_cache=cache)
             for cache in (("on", "off") if persrec else ("on",))}  # fmt: skip
    main = evals["on"]
    cost = HistoryCost.of(test, planner, tokens)
    row = {
        "name": name, "plan": options, "metrics": main.metrics,
        "history_rows_mean": float(np.mean(cost.after)), "history_tokens_mean": float(np.mean(cost.before)),
        "train_seconds": result.seconds, "train_rows_per_s": result.rows_per_s,
        "final_loss": result.final_loss, "eval_seconds": main.seconds,
    }  # fmt: skip
    if persrec:
        off = evals["off"]
        row.update(
            eval_seconds_cache_off=off.seconds,
            ranks_identical_on_off=bool(np.array_equal(main.ranks, off.ranks)),
            **{k: v for k, v in main.config.items() if "state" in k},
        )  # fmt: skip
        row["ranks_cache_off"] = ranks_list(off.ranks)
    row["ranks"] = ranks_list(main.ranks)
    return row


NOTE = ("History rows: mean rows of the history part after compression (PerSRec: item patches, its T rows "
        "and the recent text). State: keys + values of every layer kept per user by `--persrec-cache on` "
        "(prefix + T rows; `persrec_token_state_bytes_per_sample` in results.json leaves out the prefix, "
        "which is the same for every user). Seconds are wall time on a shared 2-core CPU with other jobs "
        "running: compare them loosely.")


def table(summary: dict) -> str:
    head = ["model", "HR@10", "HR@20", "NDCG@10", "NDCG@20", "history rows", "train s", "eval s",
            "state KiB/sample"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        m = r["metrics"]
        state = r.get("persrec_state_bytes_per_sample")
        eval_s = f"{r['eval_seconds']:.1f}"
        if "eval_seconds_cache_off" in r:
            eval_s += f" (cache off {r['eval_seconds_cache_off']:.1f})"
        lines.append(
            f"| {r['name']} | {m['HR@10']:.4f} | {m['HR@20']:.4f} | {m['NDCG@10']:.4f} | "
            f"{m['NDCG@20']:.4f} | "
            f"{r['history_rows_mean']:.1f} | {r['train_seconds']:.0f} | {eval_s} | "
            f"{'-' if state is None else f'{state / 1024:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="where results.json / results.md go")
    parser.add_argument("--work", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    setup = Setup()
    if args.quick:
        setup = Setup(users=60, items=40, max_items=12, catalog_steps=5, steps=4, train_samples=100,
                      batch_size=8, max_rows=2048, test_samples=10)  # fmt: skip
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persrec-llm-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        summary = run(setup, work, not args.no_progress)
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = (f"# LLM PerSRec vs PFT-I / PFT-S on the demo's synthetic data\n\n`{summary['command']}`\n\n"
            f"{summary['test_samples']} test samples, exact whole-catalog ranking (unmasked), "
            f"{setup.steps} optimizer steps x {setup.batch_size} samples for every model, all from the same "
            f"catalog-text backbone ({setup.catalog_steps} steps). CPU, {summary['threads']} thread(s).\n\n"
            f"{table(summary)}\n\n{NOTE}\n")  # fmt: skip
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
