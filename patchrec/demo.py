"""The end-to-end demo on a fresh machine with no files: synthetic data -> title BPE -> a ``tiny`` Llama
trained with patch pre-training then PFT-I, next to vanilla SFT with the same data budget (two passes over
the same training samples) -> exact whole-catalog ranking on the test split, with a popularity baseline.

Sizes are chosen so that the full demo finishes in a few minutes on a 2-core CPU while the LLMs still have
enough data to learn the topic structure that popularity cannot see (``--quick``: a seconds-long smoke run).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchrec.train_config import TrainConfig


@dataclass
class DemoConfig:
    users: int = 800  # synthetic users
    items: int = 100  # catalog size (exact ranking scores every title)
    mean_length: float = 20.0  # mean items per user
    topics: int = 10  # topic clusters: what a sequence model can learn beyond popularity
    interests: int = 2  # long-lived topics per user
    long_term_share: float = 0.9  # items drawn from them: a stable signal a small model learns quickly
    max_items: int = 15  # history length L
    k: int = 5  # PFT-I: newest items kept as text
    tokenizer_vocab: int = 2000  # title BPE: large enough that every title word is one token (fewer rows)
    train_samples: int = 8000  # seeded training subset, the same for every model
    lr: float = 3e-3  # tiny model from random init
    batch_size: int = 32  # samples per optimizer step, every model
    max_rows: int = 4096  # token budget per micro-batch
    test_samples: int = 300  # seeded test subset for the ranking
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(users=60, items=40, mean_length=14.0, topics=4, max_items=10, k=3, tokenizer_vocab=300,
                   train_samples=120, batch_size=8, max_rows=2048, test_samples=20)


@dataclass
class DemoRow:
    name: str
    metrics: dict[str, float]
    compression: float | None = None  # mean per-sample history tokens before / after compression
    rows_per_s: float | None = None  # training: packed positions per second
    samples_per_s: float | None = None  # training: sequences per second
    train_seconds: float | None = None


def _stage(demo: DemoConfig, stage: str, out: Path, init: str, epochs: int, progress: bool) -> Any:
    from patchrec.train import train

    config = TrainConfig(
        stage=stage, k=demo.k, init=init, data="synthetic", synthetic_users=demo.users,
        synthetic_items=demo.items, synthetic_length=demo.mean_length, synthetic_topics=demo.topics,
        synthetic_interests=demo.interests, synthetic_long_term_share=demo.long_term_share,
        synthetic_seed=demo.seed,
        tokenizer=str(out.parent / "tokenizer"), max_items=demo.max_items, train_samples=demo.train_samples,
        out=str(out), lr=demo.lr, weight_decay=0.01, warmup_ratio=0.05, grad_clip=1.0, epochs=epochs,
        batch_size=demo.batch_size, max_rows=demo.max_rows, seed=demo.seed, log_every=5, progress=progress,
    )  # fmt: skip
    return train(config)


def _combine(results: list[Any]) -> tuple[float, float, float]:
    seconds = sum(r.seconds for r in results)
    rows = sum(r.rows_per_s * r.seconds for r in results)
    seqs = sum(r.samples_per_s * r.seconds for r in results)
    return rows / seconds, seqs / seconds, seconds


def run_demo(demo: DemoConfig, out: Path, *, progress: bool = True) -> tuple[list[DemoRow], int]:
    """Train and evaluate everything under ``out``; returns the table rows (also written to results.json)
    and the number of test samples ranked."""
    from patchrec.baselines.popularity import Popularity
    from patchrec.data.dataset import make_samples
    from patchrec.data.synthetic import make_synthetic
    from patchrec.evaluate import evaluate
    from patchrec.metrics import rank_samples, ranking_metrics
    from patchrec.model import PackedLlama
    from patchrec.pack import history_token_counts
    from patchrec.plan import make_planner
    from patchrec.tokenizer_train import train_title_tokenizer
    from patchrec.tokens import load_tokenizer, tokenize_dataset
    from patchrec.train import random_subset

    out.mkdir(parents=True, exist_ok=True)
    dataset = make_synthetic(demo.users, demo.items, demo.mean_length, seed=demo.seed, num_topics=demo.topics,
                             interests=demo.interests, long_term_share=demo.long_term_share)
    train_title_tokenizer(dataset.titles, out / "tokenizer", demo.tokenizer_vocab,
                          extra_texts=[dataset.system_prompt, dataset.user_prompt])
    tokens = tokenize_dataset(load_tokenizer(out / "tokenizer"), dataset)
    test = random_subset(make_samples(dataset, "test", demo.max_items), demo.test_samples, demo.seed + 2)
    ks = (10, 20)

    pop_ranks = rank_samples(Popularity.fit(dataset).scorer(test), test)
    rows = [DemoRow("popularity", ranking_metrics(pop_ranks, ks))]

    # Same data budget for both LLMs: two passes over the same training subset.
    vanilla = _stage(demo, "vanilla", out / "vanilla", "tiny", 2, progress)
    stage1 = _stage(demo, "pretrain", out / "pretrain", "tiny", 1, progress)
    stage2 = _stage(demo, "pft-i", out / "pft-i", str(out / "pretrain"), 1, progress)

    for name, plan, results in (("vanilla SFT", "vanilla", [vanilla]),
                                (f"pretrain -> PFT-I (k={demo.k})", "pft-i", [stage1, stage2])):
        planner = make_planner(plan, k=demo.k)
        model = PackedLlama.from_pretrained(results[-1].model_dir)
        result = evaluate(model, tokens, test, planner=planner, ranking="exact", ks=ks, progress=progress)
        before, after = history_token_counts(test, planner, tokens)
        keep = after > 0
        compression = float(np.mean(before[keep] / after[keep])) if keep.any() else 1.0
        rows_s, seqs_s, seconds = _combine(results)
        rows.append(DemoRow(name, result.metrics, compression, rows_s, seqs_s, seconds))

    summary = {"config": dataclasses.asdict(demo), "test_samples": len(test), "ranking": "exact",
               "mask_history": False, "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rows, len(test)


def format_table(rows: list[DemoRow]) -> str:
    head = (f"{'model':<26} {'HR@10':>7} {'HR@20':>7} {'NDCG@10':>8} {'NDCG@20':>8} {'CR':>5} "
            f"{'train rows/s':>12} {'train seq/s':>11} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def opt(value, fmt):
            return format(value, fmt) if value is not None else "-"

        m = r.metrics
        lines.append(f"{r.name:<26} {m['HR@10']:>7.4f} {m['HR@20']:>7.4f} {m['NDCG@10']:>8.4f} "
                     f"{m['NDCG@20']:>8.4f} {opt(r.compression, '5.2f'):>5} {opt(r.rows_per_s, '12.0f'):>12} "
                     f"{opt(r.samples_per_s, '11.1f'):>11} {opt(r.train_seconds, '8.1f'):>8}")
    return "\n".join(lines)


def main(
    out: str | None = None, *, quick: bool = False, threads: int | None = 1, progress: bool = True
) -> str:
    """Run the demo (in a temporary directory unless ``out``); returns the printed table."""
    demo = DemoConfig.quick() if quick else DemoConfig()
    previous = torch.get_num_threads()
    if threads:
        # On a busy 2-core machine one OpenMP thread is far steadier than two (measured 1 s vs up to 25 s).
        torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    start = time.perf_counter()
    try:
        if out is None:
            with tempfile.TemporaryDirectory(prefix="patchrec-demo-") as tmp:
                rows, num_test = run_demo(demo, Path(tmp), progress=progress)
        else:
            rows, num_test = run_demo(demo, Path(out), progress=progress)
    finally:
        torch.set_num_threads(previous)
    table = format_table(rows)
    return (f"{table}\n\nsynthetic: {demo.users} users, {demo.items} items, L={demo.max_items}; "
            f"exact whole-catalog ranking of {num_test} test samples (unmasked); "
            f"wall time {time.perf_counter() - start:.0f} s")
