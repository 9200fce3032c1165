"""Shared training loop and evaluation of the ID-based sequence models (SASRec, GRU4Rec).

Loss positions. A model reads a packed batch of item sequences and is trained with cross-entropy over the
whole catalog at *every* position of every sequence (next item at each step), as in SASRec and GRU4Rec,
not only at a sample's last position: the same training targets as the ``train`` samples of docs/method.md §4
(target positions ``idx >= 3`` inside the user's train range), but each target costs one position instead
of a whole history of up to L items, so an epoch is ~L times cheaper. The price: a user's train prefix
longer than L + 1 items is cut into windows of L + 1 items (from the newest backwards), and a target early in
a later window sees fewer than L items of history (a sample would see exactly the latest L). Evaluation uses
the samples exactly: history = latest L items, score = the last position's output.

Model selection: validation NDCG@10 (whole-catalog ranks, same masking flag as the final evaluation) after
every ``eval_every`` epochs; the best weights are kept and restored; training stops after ``patience``
evaluations without improvement or at ``epochs``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from patchrec.data.dataset import Dataset, Samples, gather_ragged, make_samples
from patchrec.eval.metrics import rank_samples, ranking_metrics
from patchrec.persrec.sequence import cached_scorer


@dataclass
class TrainConfig:
    epochs: int = 200  # upper bound; early stopping on validation NDCG@10 usually ends far sooner
    batch_size: int = 128  # training windows (sequences of up to L items) per step; SASRec's default
    lr: float = 1e-3  # Adam learning rate (SASRec paper); GRU4Rec needs ~5e-3 (patchrec baseline uses it)
    weight_decay: float = 0.0  # SASRec relies on dropout, not weight decay
    grad_clip: float = 5.0  # max global gradient norm; only guards against rare spikes (0 = off)
    eval_every: int = 1  # epochs between validation evaluations
    # evaluations without a better validation NDCG@10 before stopping; generous because SASRec plateaus
    # for several epochs early on (measured on ML-100K) before it starts to improve
    patience: int = 10
    max_minutes: float = 0.0  # wall-clock budget for training (checked after each epoch); 0 = none
    eval_batch_size: int = 512  # samples scored at once ([B, num_items] score matrix)
    seed: int = 0  # seeds Python, numpy and torch (weights, dropout, shuffling)


class SequenceModel(Protocol):
    """What the loop needs from a model: hidden states of packed sequences, and logits from them."""

    def __call__(self, items: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def cu_seqlens_of(lengths: np.ndarray) -> torch.Tensor:
    """int32 [B+1] offsets (the varlen-attention convention)."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return torch.from_numpy(cu)


@dataclass
class TrainingWindows:
    """Training sequences: window ``w`` reads ``items[start[w] : start[w] + length[w]]`` (absolute indices
    into ``dataset.items``) and predicts the item after each position; ``weight`` marks the positions whose
    target is a training target (flat, aligned with the windows' positions)."""

    start: np.ndarray  # int64 [W]
    length: np.ndarray  # int64 [W]
    weight: np.ndarray  # bool [sum(length)]

    def __len__(self) -> int:
        return len(self.start)


def training_windows(dataset: Dataset, max_len: int, min_position: int = 3) -> TrainingWindows:
    """Cut every user's train prefix into windows of ``max_len`` inputs (module docstring)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ranges = dataset.splits["train"]
    starts, lengths, weights = [], [], []
    for u in np.flatnonzero(ranges[:, 0] >= 0):  # one iteration per user, vectorised inside
        s, e = int(ranges[u, 0]), int(ranges[u, 1])
        first = max(s, min_position)  # first target position of the user's train samples
        if first > e:
            continue
        # target positions [a, b] per window, newest window first, b - a + 1 <= max_len
        b = np.arange(e, first - 1, -max_len, dtype=np.int64)
        a = np.maximum(b - max_len + 1, 1)
        base = int(dataset.user_offsets[u])
        for lo, hi in zip(a.tolist(), b.tolist(), strict=True):
            starts.append(base + lo - 1)  # inputs are the items just before each target
            lengths.append(hi - lo + 1)
            weights.append(np.arange(lo, hi + 1) >= first)
    if not starts:
        raise ValueError(
            f"dataset {dataset.name!r} has no training targets (train positions >= {min_position})"
        )
    return TrainingWindows(
        np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64), np.concatenate(weights)
    )


def score_last(model: SequenceModel, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Scores of every catalog item after each packed sequence: [B, num_items] from the last positions."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    hidden = model(items, cu_seqlens, int(lengths.max()))
    return model.logits(hidden[cu_seqlens[1:].long() - 1])


def sample_scorer(model: SequenceModel, samples: Samples) -> Callable[[np.ndarray], torch.Tensor]:
    """``score_fn`` for ``rank_samples``: packs the samples' histories (latest L items, no padding)."""
    flat = samples.dataset.items.astype(np.int64)

    def score(index: np.ndarray) -> torch.Tensor:
        lengths = samples.history_lengths[index]
        items = torch.from_numpy(gather_ragged(flat, samples.hist_start[index], lengths))
        with torch.no_grad():
            return score_last(model, items, cu_seqlens_of(lengths))

    return score


def evaluate(
    model: nn.Module,
    samples: Samples,
    *,
    mask_history: bool = False,
    ties: str = "pessimistic",
    batch_size: int = 512,
    progress: bool = False,
    persrec_cache: bool = False,
) -> np.ndarray:
    """Whole-catalog ranks of ``samples``' targets under ``model`` (eval mode, restored afterwards);
    ``persrec_cache``: through each user's cached PerSRec state (``patchrec.persrec.sequence``)."""
    was_training = model.training
    model.eval()
    try:
        return rank_samples(
            cached_scorer(model, samples) if persrec_cache else sample_scorer(model, samples),
            samples,
            mask_history=mask_history,
            ties=ties,
            batch_size=batch_size,
            progress=progress,
            desc=f"eval {samples.split}",
        )
    finally:
        model.train(was_training)


@dataclass
class TrainResult:
    best_epoch: int  # epoch (1-based) whose weights were kept; 0 = the untrained model
    best_val_ndcg10: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per evaluation: epoch, loss, metrics


def fit(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    max_len: int,
    mask_history: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on the train split, select on validation NDCG@10, restore the best weights."""
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.eval_every < 1 or config.patience < 1:
        raise ValueError("eval_every and patience must be >= 1")
    if config.max_minutes < 0:
        raise ValueError(f"max_minutes must be >= 0, got {config.max_minutes}")
    windows = training_windows(dataset, max_len)
    val = make_samples(dataset, "val", max_len)
    if len(val) == 0:
        raise ValueError(f"dataset {dataset.name!r} has no validation samples for model selection")
    flat = dataset.items.astype(np.int64)
    window_offsets = np.concatenate([[0], np.cumsum(windows.length)])
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )

    def validate() -> dict[str, float]:
        ranks = evaluate(model, val, mask_history=mask_history, batch_size=config.eval_batch_size)
        return ranking_metrics(ranks, (10, 20))

    t0 = time.perf_counter()
    best = validate()["NDCG@10"]
    best_state, best_epoch, bad, epoch = copy.deepcopy(model.state_dict()), 0, 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, config.epochs + 1), desc=type(model).__name__, disable=not progress)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(windows))
        total, count = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            batch = order[i : i + config.batch_size]
            lengths = windows.length[batch]
            inputs = gather_ragged(flat, windows.start[batch], lengths)
            targets = gather_ragged(flat, windows.start[batch] + 1, lengths)
            weight = gather_ragged(windows.weight, window_offsets[batch], lengths)
            hidden = model(torch.from_numpy(inputs), cu_seqlens_of(lengths), int(lengths.max()))
            # logits only where there is a training target: [T', N] instead of [T, N]
            keep = torch.from_numpy(weight)
            loss = F.cross_entropy(model.logits(hidden[keep]), torch.from_numpy(targets[weight]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            total += loss.item() * int(weight.sum())
            count += int(weight.sum())
        out_of_time = config.max_minutes > 0 and time.perf_counter() - t0 > 60 * config.max_minutes
        if epoch % config.eval_every and epoch != config.epochs and not out_of_time:
            bar.set_postfix(loss=f"{total / count:.3f}", best_ndcg10=f"{best:.4f}")
            continue
        metrics = validate()
        history.append({"epoch": epoch, "loss": total / count, **{f"val_{k}": v for k, v in metrics.items()}})
        if metrics["NDCG@10"] > best:
            best, best_epoch, bad = metrics["NDCG@10"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        bar.set_postfix(loss=f"{total / count:.3f}", ndcg10=f"{metrics['NDCG@10']:.4f}", best=f"{best:.4f}")
        if bad >= config.patience or out_of_time:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch, best, epoch, time.perf_counter() - t0, history)
