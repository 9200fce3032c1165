"""The end-to-end demo on a fresh machine with no files: synthetic data (written as a release directory that
every training stage reads, so generator options such as ``drift_length`` reach them) -> title BPE -> a
``tiny`` Llama trained on catalog text (``patchrec.train.catalog_pretrain``: what pre-training gives a real
LLM, token embeddings that mean something, so that patches do too) -> from that backbone, with the same
optimizer steps of the same batch size each: vanilla SFT on the full history, patch pre-training then PFT-I,
and vanilla SFT on the newest items only (about PFT-I's history rows: the equal-compute row) -> exact
whole-catalog ranking on the test split, next to popularity and a topic-count oracle with the full vs the
short history (how much the old history matters).

Sizes are chosen so that the full demo finishes in about 5 minutes on a 2-core CPU (315 s measured with one
thread; other jobs on the same two cores can nearly double it), ``--quick`` is a seconds-long smoke run and
``--backbone PATH`` the same comparison from a real model at CPU-sized settings.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from patchrec.baselines.popularity import Popularity
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import Dataset, Samples
from patchrec.data.synthetic import item_topics, make_synthetic
from patchrec.eval.metrics import rank_samples, ranking_metrics
from patchrec.experiments.stages import (
    HistoryCost,
    catalog_backbone,
    combined_rates,
    evaluate_trained,
    invocation,
    ranked_test_samples,
    ranks_list,
    small_stage,
    write_workspace,
)
from patchrec.train.loop import TrainResult, train

KS = (10, 20)


@dataclass
class DemoConfig:
    users: int = 2400  # synthetic users (2400: 842 test samples, so one HR@20 s.e. is about 0.017)
    items: int = 100  # catalog size (exact ranking scores every title)
    mean_length: float = 40.0  # mean items per user
    topics: int = 10  # topic clusters: what a sequence model can learn beyond popularity
    interests: int = 2  # long-lived topics per user
    long_term_share: float = 0.9  # items drawn from them; the rest follow a short-lived drift topic
    # Mean items before the drift topic changes. Short-lived (3, the generator's default is 6): the newest
    # items are noisier, so the long-lived interests show in the older history more than in the newest items
    # (topic-count oracle, 5 generator seeds of 4000 users: full - last 8 = +0.072 HR@20 at 3, +0.045 at 6).
    drift_length: float = 3.0
    max_items: int = 30  # history length L
    k: int = 5  # PFT-I: newest items kept as text
    short_items: int = 8  # equal-compute row: vanilla on the newest items only, about PFT-I's history rows
    tokenizer_vocab: int = 2000  # title BPE: large enough that every title word is one token (fewer rows)
    catalog_steps: int = 1000  # catalog-text stage (patchrec.train.catalog_pretrain); 0 = none
    steps: int = 300  # optimizer steps of every recommender (PFT-I: patch pre-training, then PFT-I)
    # PFT-I: share of the steps spent on patch pre-training (the rest: PFT-I). Measured on the default
    # (HR@20 of PFT-I): 0.5 -> 0.423, 0.33 -> 0.461, 0.25 -> 0.481, 0 (no patch pre-training) -> 0.481.
    pretrain_share: float = 0.25
    train_samples: int = 8000  # seeded training subset, the same for every model
    lr: float = 3e-3  # tiny model from random init
    batch_size: int = 32  # samples per optimizer step, every model
    max_rows: int = 4096  # token budget per micro-batch
    test_samples: int = 1000  # seeded test subset for the ranking (the default has 842: all of them)
    seed: int = 0
    backbone: str | None = None  # a real model (HF directory or .gguf) instead of the tiny one: no BPE,
    # no catalog-text stage (the model is pre-trained), its own tokenizer

    @classmethod
    def for_backbone(cls, path: str) -> DemoConfig:
        """``patchrec demo --backbone PATH``: sizes for a ~135M model on a 2-core CPU (a few minutes): few
        steps, so it shows the pipeline running from a real model rather than a converged comparison."""
        # drift_length and pretrain_share as in the README's measured --backbone run.
        return cls(users=200, items=50, mean_length=24.0, topics=5, drift_length=6.0, max_items=15, k=5,
                   short_items=6, catalog_steps=0, steps=8, pretrain_share=0.5, train_samples=1000, lr=1e-4,
                   batch_size=8, max_rows=4096, test_samples=30, backbone=path)

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(users=60, items=40, mean_length=14.0, topics=4, max_items=10, k=3, short_items=4,
                   tokenizer_vocab=300, catalog_steps=10, steps=10, train_samples=120, batch_size=8,
                   max_rows=2048, test_samples=20)


@dataclass
class DemoRow:
    name: str
    metrics: dict[str, float]
    compression: float | None = None  # mean per-sample history tokens before / after compression
    rows_per_s: float | None = None  # training: packed positions per second
    samples_per_s: float | None = None  # training: sequences per second
    train_seconds: float | None = None
    history_rows: float | None = None  # mean history rows per test sample after compression
    ranks: list[int] | None = None  # 0-based rank of each test sample's target (results.json: ranked_samples)


def synthetic_dataset(demo: DemoConfig) -> Dataset:
    """The demo's synthetic dataset (``patchrec.data.synthetic`` with the demo's generator options)."""
    return make_synthetic(demo.users, demo.items, demo.mean_length, seed=demo.seed, num_topics=demo.topics,
                          interests=demo.interests, long_term_share=demo.long_term_share,
                          drift_length=demo.drift_length)


def _stage(demo: DemoConfig, work: Path, name: str, stage: str, init: str, steps: int, progress: bool,
           max_items: int | None = None) -> TrainResult:  # fmt: skip
    # Every stage reads the demo's dataset from the release directory run_demo wrote (work / "data"): the
    # same users, items and splits as the ranking, whatever generator options the demo uses.
    return train(small_stage(
        work, work / name, stage=stage, k=demo.k, init=init,
        tokenizer=None if demo.backbone else str(work / "tokenizer"), max_items=max_items or demo.max_items,
        train_samples=demo.train_samples, lr=demo.lr, steps=steps, batch_size=demo.batch_size,
        max_rows=demo.max_rows, seed=demo.seed, log_every=5, progress=progress,
    ))  # fmt: skip


def topic_count_scorer(samples, topic_of_item: np.ndarray, counts: np.ndarray, last: int | None = None):
    """A count "oracle" that knows every item's hidden topic: score = (topic count in the history, or in its
    newest ``last`` items, + 0.5) x item popularity. Full vs short history: how much old history matters."""
    items = samples.dataset.items
    num_topics = int(topic_of_item.max()) + 1
    pop = torch.as_tensor(counts, dtype=torch.float64) + 1.0

    def score(index: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(index), len(pop), dtype=torch.float64)
        for row, i in enumerate(index.tolist()):
            start = samples.hist_start[i]
            end = samples.target_index[i]
            if last is not None:
                start = max(start, end - last)
            hist = np.bincount(topic_of_item[items[start:end]], minlength=num_topics) + 0.5
            out[row] = torch.as_tensor(hist[topic_of_item], dtype=torch.float64) * pop
        return out.float()

    return score


def _count_rows(demo: DemoConfig, dataset: Dataset, test: Samples,
                topic_of_item: np.ndarray) -> list[DemoRow]:  # fmt: skip
    """Popularity, and the topic-count oracle with the full and the short history."""
    popularity = Popularity.fit(dataset)
    ranks = rank_samples(popularity.scorer(test), test)
    rows = [DemoRow("popularity", ranking_metrics(ranks, KS), ranks=ranks_list(ranks))]
    n = demo.short_items
    for name, last in ((f"topic oracle, L={demo.max_items}", None), (f"topic oracle, last {n}", n)):
        scorer = topic_count_scorer(test, topic_of_item, np.asarray(popularity.counts), last)
        ranks = rank_samples(scorer, test)
        rows.append(DemoRow(name, ranking_metrics(ranks, KS), ranks=ranks_list(ranks)))
    return rows


def _llm_row(name: str, plan: str, demo: DemoConfig, results: list[TrainResult], tokens, samples: Samples,
             progress: bool) -> DemoRow:  # fmt: skip
    """One LLM row: the last stage's model ranked exactly, its history cost and its stages' training rates."""
    planner = make_planner(plan, k=demo.k)
    result = evaluate_trained(results[-1].model_dir, tokens, samples, planner, ks=KS, progress=progress)
    cost = HistoryCost.of(samples, planner, tokens)
    rows_s, seqs_s, seconds = combined_rates(results)
    return DemoRow(name, result.metrics, cost.compression(), rows_s, seqs_s, seconds,
                   float(np.mean(cost.after)), ranks_list(result.ranks))  # fmt: skip


def run_demo(demo: DemoConfig, out: Path, *, progress: bool = True) -> tuple[list[DemoRow], int]:
    """Train and evaluate everything under ``out``; returns the table rows (also written to results.json,
    with every row's per-sample ranks and the test samples they rank) and the number of test samples."""
    half = round(demo.steps * demo.pretrain_share)
    if not 0 < half < demo.steps:  # a stage of 0 steps would mean one epoch (TrainConfig.max_steps = 0)
        raise ValueError(f"pretrain_share {demo.pretrain_share} of {demo.steps} steps leaves a stage empty")
    out.mkdir(parents=True, exist_ok=True)
    dataset = synthetic_dataset(demo)
    write_workspace(dataset, out, None if demo.backbone else demo.tokenizer_vocab)
    topic_of_item = item_topics(demo.items, demo.topics, demo.seed)
    tokens = tokenize_dataset(load_tokenizer(demo.backbone or out / "tokenizer"), dataset)
    ranked = ranked_test_samples(dataset, demo.max_items, demo.test_samples, demo.seed)
    test = ranked.samples
    rows = _count_rows(demo, dataset, test, topic_of_item)

    # Every recommender starts from the same backbone and takes the same optimizer steps of batch_size
    # samples.
    backbone, catalog_seconds = demo.backbone or "tiny", None
    if demo.catalog_steps > 0 and not demo.backbone:
        catalog = catalog_backbone(dataset, topic_of_item, out, steps=demo.catalog_steps, lr=demo.lr,
                                   seed=demo.seed)  # fmt: skip
        backbone, catalog_seconds = str(catalog.model_dir), catalog.seconds
    vanilla = _stage(demo, out, "vanilla", "vanilla", backbone, demo.steps, progress)
    stage1 = _stage(demo, out, "pretrain", "pretrain", backbone, half, progress)
    stage2 = _stage(demo, out, "pft-i", "pft-i", str(out / "pretrain"), demo.steps - half, progress)
    short = _stage(demo, out, "vanilla-short", "vanilla", backbone, demo.steps, progress, demo.short_items)
    short_start = np.maximum(test.hist_start, test.target_index - demo.short_items)
    short_test = dataclasses.replace(test, max_items=demo.short_items, _lengths=None, hist_start=short_start)
    for name, plan, results, samples in (
        ("vanilla SFT", "vanilla", [vanilla], test),
        (f"pretrain -> PFT-I (k={demo.k})", "pft-i", [stage1, stage2], test),
        (f"vanilla SFT, last {demo.short_items}", "vanilla", [short], short_test),
    ):
        rows.append(_llm_row(name, plan, demo, results, tokens, samples, progress))

    summary = {"command": invocation(), "config": dataclasses.asdict(demo), "test_samples": len(test),
               "ranking": "exact", "mask_history": False, "optimizer_steps": demo.steps,
               "samples_per_step": demo.batch_size,
               "catalog_text_seconds": catalog_seconds, "ks": list(KS), "ranked_samples": ranked.record(),
               "rows": [dataclasses.asdict(r) for r in rows]}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rows, len(test)


def format_table(rows: list[DemoRow]) -> str:
    head = (f"{'model':<30} {'HR@10':>7} {'HR@20':>7} {'NDCG@10':>8} {'NDCG@20':>8} {'CR':>5} "
            f"{'hist rows':>9} {'train rows/s':>12} {'train seq/s':>11} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def opt(value, fmt):
            return format(value, fmt) if value is not None else "-"

        m = r.metrics
        lines.append(f"{r.name:<30} {m['HR@10']:>7.4f} {m['HR@20']:>7.4f} {m['NDCG@10']:>8.4f} "
                     f"{m['NDCG@20']:>8.4f} {opt(r.compression, '5.2f'):>5} "
                     f"{opt(r.history_rows, '9.1f'):>9} {opt(r.rows_per_s, '12.0f'):>12} "
                     f"{opt(r.samples_per_s, '11.1f'):>11} {opt(r.train_seconds, '8.1f'):>8}")
    return "\n".join(lines)


def main(
    out: str | None = None, *, quick: bool = False, threads: int | None = 1, progress: bool = True,
    backbone: str | None = None,
) -> str:
    """Run the demo (in a temporary directory unless ``out``); returns the printed table."""
    if backbone and quick:
        demo = dataclasses.replace(DemoConfig.quick(), backbone=backbone, catalog_steps=0, lr=1e-4, steps=2,
                                   pretrain_share=0.5)
    elif backbone:
        demo = DemoConfig.for_backbone(backbone)
    else:
        demo = DemoConfig.quick() if quick else DemoConfig()
    previous = torch.get_num_threads()
    if threads:
        # On a busy 2-core machine one OpenMP thread is far steadier than two (measured 1 s vs up to 25 s).
        torch.set_num_threads(threads)
    if not progress:
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
    half = round(demo.steps * demo.pretrain_share)
    origin = demo.backbone or (f"tiny + catalog-text stage ({demo.catalog_steps} steps)"
                               if demo.catalog_steps else "tiny, random init")
    serve = f"serve the PFT-I model over HTTP: patchrec serve --model {Path(out) / 'pft-i'}\n" if out else ""
    return (f"{table}\n\nsynthetic: {demo.users} users, {demo.items} items, L={demo.max_items}; "
            f"every LLM starts from the same backbone [{origin}] and takes {demo.steps} optimizer steps "
            f"of {demo.batch_size} samples (PFT-I: {half} patch pre-training + {demo.steps - half} PFT-I); "
            f"'vanilla SFT, last {demo.short_items}' reads about as many history rows as PFT-I "
            f"(equal compute); "
            f"exact whole-catalog ranking of {num_test} test samples (unmasked); "
            f"wall time {time.perf_counter() - start:.0f} s\n{serve}")
