"""The glue every experiment repeats ("train a stage, evaluate a checkpoint"): a synthetic dataset written as
a release with its title BPE and catalog-text backbone, the seeded test subset, a training stage on the small
CPU recipe, a trained model loaded and ranked, what its history costs, and the raw part of a results row
(the per-sample ranks, so that every reported metric can be recomputed from them).

Used by ``patchrec.experiments.demo``, ``patchrec.experiments.reproduce`` and the benches built on the demo
(``benches/persrec_llm_demo.py``).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchrec.batching.pack import history_token_counts
from patchrec.batching.plan import Planner
from patchrec.batching.tokenizer_train import train_title_tokenizer
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Dataset, Samples, make_samples
from patchrec.data.release import write_release
from patchrec.eval.evaluate import EvalResult, evaluate
from patchrec.model.decoder import PackedDecoder
from patchrec.train.catalog_pretrain import CatalogTextConfig, CatalogTextResult, train_catalog_text
from patchrec.train.config import TrainConfig
from patchrec.train.loop import TrainResult
from patchrec.train.stage_inputs import random_subset, subset_index

# The seeded subsets of a run: training samples at ``seed`` (patchrec.train), validation at seed + 1, the
# test samples every experiment ranks at seed + 2.
TEST_SEED_OFFSET = 2


@dataclass(frozen=True)
class RankedSamples:
    """The test samples an experiment ranks, and where they come from (what a results file records)."""

    samples: Samples
    max_items: int  # history length L
    index: np.ndarray  # int64, indices into make_samples(dataset, "test", max_items)

    def record(self) -> dict[str, Any]:
        """JSON: the split, L and the indices (enough to rebuild the samples from the same dataset)."""
        return {"split": "test", "max_items": self.max_items, "index": [int(i) for i in self.index]}


def ranked_test_samples(dataset: Dataset, max_items: int, size: int, seed: int) -> RankedSamples:
    """The seeded test subset at history length ``max_items`` (``size`` <= 0: all); the same targets at every
    L, since the samples of a split do not depend on L."""
    test = make_samples(dataset, "test", max_items)
    subset = random_subset(test, size, seed + TEST_SEED_OFFSET)
    return RankedSamples(subset, max_items, subset_index(len(test), size, seed + TEST_SEED_OFFSET))


def write_workspace(dataset: Dataset, work: Path, tokenizer_vocab: int | None) -> None:
    """``dataset`` as a release in ``work/data``, which every stage reads (so every stage sees the users,
    items and splits that are ranked, whatever generator options made them); with ``tokenizer_vocab``, a
    title BPE (prompt texts included) in ``work/tokenizer``."""
    write_release(dataset, work / "data", overwrite=True)
    if tokenizer_vocab is not None:
        train_title_tokenizer(dataset.titles, work / "tokenizer", tokenizer_vocab,
                              extra_texts=[dataset.system_prompt, dataset.user_prompt])  # fmt: skip


def catalog_backbone(dataset: Dataset, topic_of_item: np.ndarray, work: Path, *, steps: int, lr: float,
                     seed: int) -> CatalogTextResult:  # fmt: skip
    """A ``tiny`` Llama trained on catalog text (``patchrec.train.catalog_pretrain``) with the workspace's
    BPE, into ``work/catalog``: the shared backbone of the small experiments."""
    config = CatalogTextConfig(steps=steps, batch_size=32, lr=lr, seed=seed)
    return train_catalog_text(dataset.titles, topic_of_item, work / "tokenizer", work / "catalog",
                              preset="tiny", config=config)  # fmt: skip


def small_stage(work: Path, out: Path, *, stage: str, init: str, tokenizer: str | None, max_items: int,
                train_samples: int, lr: float, steps: int, batch_size: int, max_rows: int, seed: int,
                log_every: int, progress: bool, **plan: Any) -> TrainConfig:  # fmt: skip
    """A training stage of the small CPU experiments: ``steps`` AdamW steps (weight decay 0.01, 5% warmup,
    gradient clip 1.0) on the workspace's release, written to ``out``; ``plan``: the plan's own options
    (``k``, ``g``, ``persrec_*``)."""
    return TrainConfig(
        stage=stage, init=init, data=str(work / "data"), tokenizer=tokenizer, max_items=max_items,
        train_samples=train_samples, out=str(out), lr=lr, weight_decay=0.01, warmup_ratio=0.05, grad_clip=1.0,
        max_steps=steps, batch_size=batch_size, max_rows=max_rows, seed=seed, log_every=log_every,
        progress=progress, **plan,
    )  # fmt: skip


def load_trained(model_dir: str | Path, *, vocab_size: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> PackedDecoder:  # fmt: skip
    """A trained model directory (or the backbone) for ranking: its own dtype unless ``dtype``, grown to
    ``vocab_size`` when given (a backbone before the history markers), on ``device``."""
    model = PackedDecoder.from_pretrained(model_dir, vocab_size=vocab_size, dtype=dtype)
    return model if device is None else model.to(device)


def evaluate_trained(model_dir: str | Path, tokens: TokenizedDataset, samples: Samples, planner: Planner, *,
                     ks=(10, 20), progress: bool = True, **kwargs: Any) -> EvalResult:  # fmt: skip
    """Exact whole-catalog ranking (``patchrec.eval.evaluate``; ``kwargs`` passed on) of ``samples`` by the
    model saved in ``model_dir``."""
    kwargs.setdefault("ranking", "exact")
    return evaluate(load_trained(model_dir), tokens, samples, planner=planner, ks=ks, progress=progress,
                    **kwargs)  # fmt: skip


@dataclass(frozen=True)
class HistoryCost:
    """History title tokens per sample before and after a plan's compression (the last view)."""

    before: np.ndarray  # int64 [S]
    after: np.ndarray  # int64 [S]

    @classmethod
    def of(cls, samples: Samples, planner: Planner, tokens: TokenizedDataset) -> HistoryCost:
        return cls(*history_token_counts(samples, planner, tokens))

    def compression(self) -> float:
        """Mean per-sample ratio before / after over the samples with a non-empty compressed history (1.0
        when there is none)."""
        keep = self.after > 0
        return float(np.mean(self.before[keep] / self.after[keep])) if keep.any() else 1.0


def combined_rates(results: list[TrainResult]) -> tuple[float, float, float]:
    """(packed rows per second, sequences per second, seconds) of stages trained one after the other."""
    seconds = sum(r.seconds for r in results)
    rows = sum(r.rows_per_s * r.seconds for r in results)
    seqs = sum(r.samples_per_s * r.seconds for r in results)
    return rows / seconds, seqs / seconds, seconds


def ranks_list(ranks: np.ndarray) -> list[int]:
    """Per-sample 0-based ranks as JSON (``patchrec.eval.metrics.ranking_metrics`` recomputes the metrics)."""
    return [int(r) for r in np.asarray(ranks)]


def invocation() -> str:
    """The command line that is running, as a user would type it (``patchrec ...`` for the console script
    and ``python -m patchrec``), recorded with the results."""
    program = Path(sys.argv[0]).name
    program = "patchrec" if program in ("__main__.py", "patchrec") else f"python {sys.argv[0]}"
    return shlex.join([program, *sys.argv[1:]])


__all__ = ["TEST_SEED_OFFSET", "HistoryCost", "RankedSamples", "catalog_backbone", "combined_rates",
           "evaluate_trained", "invocation", "load_trained", "ranked_test_samples", "ranks_list",
           "small_stage", "write_workspace"]
