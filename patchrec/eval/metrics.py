"""Whole-catalog ranking metrics (docs/method.md §5), shared by the ID baselines and the LLM evaluation.

Every model is evaluated the same way: a score for every catalog item, the 0-based rank ``r`` of the true
item, then ``HR@K = mean(r < K)`` and ``NDCG@K = mean(1 / log2(r + 2) if r < K else 0)``.

Ties. ``rank = #items with a strictly higher score + a tie term``; the tie term is chosen by ``ties``:
- ``"pessimistic"`` (default): every other item with an equal score counts as ranked above the target, so a
  model can never gain from ties (a constant scorer gets the worst rank, not the best);
- ``"stable"``: equal-score items with a smaller id count as above (what a stable descending sort gives);
- ``"optimistic"``: ties count for the target (rank = #strictly higher, the most flattering reading).
The rule is written into every results file next to the metrics.

Seen items. With ``mask_history`` every item the user interacted with before the target (the user's whole
prefix, not only the latest L items the model read; RecBole-style full-sort masking) gets score ``-inf``.
The target itself is never masked, so a repeated item cannot be ranked out of reach; docs/method.md §5: the
released datasets never repeat a target. Default: unmasked, the authors' protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from patchrec.data.dataset import Samples, gather_ragged

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)
TIE_RULES = ("pessimistic", "stable", "optimistic")


def full_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask_rows: torch.Tensor | None = None,
    mask_items: torch.Tensor | None = None,
    ties: str = "pessimistic",
) -> torch.Tensor:
    """0-based rank of each row's target among all columns of ``scores``.

    scores: float [B, N], one row per sample, one column per catalog item.
    targets: int [B], the true item of each row.
    mask_rows, mask_items: int [M] each (optional, together): item ``mask_items[j]`` is masked (score -inf)
        in row ``mask_rows[j]``, unless it is that row's target.
    Returns int64 [B]. ``scores`` is not modified.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [B, N], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if targets.ndim != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"targets must have shape [{scores.shape[0]}], got {tuple(targets.shape)}")
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if (mask_rows is None) != (mask_items is None):
        raise ValueError("mask_rows and mask_items must be given together")
    num_items = scores.shape[1]
    targets = targets.to(device=scores.device, dtype=torch.long)
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_items):
        raise ValueError(f"targets must be item ids in [0, {num_items})")
    # NaN compares false with everything, so a NaN score would silently rank as the best item
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if mask_rows is not None:
        mask_rows = mask_rows.to(device=scores.device, dtype=torch.long)
        mask_items = mask_items.to(device=scores.device, dtype=torch.long)
        if mask_rows.shape != mask_items.shape or mask_rows.ndim != 1:
            raise ValueError("mask_rows and mask_items must be 1-D of the same length")
        if mask_items.numel() and (mask_items.min() < 0 or mask_items.max() >= num_items):
            raise ValueError(f"mask_items must be item ids in [0, {num_items})")
        if mask_rows.numel() and (mask_rows.min() < 0 or mask_rows.max() >= scores.shape[0]):
            raise ValueError(f"mask_rows must be row indices in [0, {scores.shape[0]})")
        keep = mask_items != targets[mask_rows]
        scores = scores.clone()
        scores[mask_rows[keep], mask_items[keep]] = -math.inf
    target_scores = scores.gather(1, targets[:, None])
    ranks = (scores > target_scores).sum(dim=1)
    if ties == "pessimistic":
        ranks += (scores == target_scores).sum(dim=1) - 1  # minus the target itself
    elif ties == "stable":
        lower_id = torch.arange(num_items, device=scores.device)[None, :] < targets[:, None]
        ranks += ((scores == target_scores) & lower_id).sum(dim=1)
    return ranks


def ranking_metrics(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"HR@K": ..., "NDCG@K": ...}`` for each K, from 0-based ranks (means over samples)."""
    ranks = torch.as_tensor(np.asarray(ranks), dtype=torch.float64)
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError("ranks must be a non-empty 1-D array")
    if (ranks < 0).any():
        raise ValueError("ranks must be >= 0")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
    out: dict[str, float] = {}
    gain = 1.0 / torch.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, gain, torch.zeros_like(gain)).mean().item()
    return out


def history_mask_pairs(samples: Samples, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, items) of every item before the target in the user's sequence, for samples ``index``.

    Row ``j`` refers to ``index[j]``. Uses the user's whole prefix, not only the latest ``max_items``
    (module docstring). Vectorised: no per-sample Python loop.
    """
    ds = samples.dataset
    index = np.asarray(index, dtype=np.int64)
    starts = ds.user_offsets[samples.user[index].astype(np.int64)]
    stops = samples.target_index[index]
    lengths = stops - starts
    rows = np.repeat(np.arange(len(index), dtype=np.int64), lengths)
    items = gather_ragged(ds.items, starts, lengths)
    return torch.from_numpy(rows), torch.from_numpy(items.astype(np.int64))


def rank_samples(
    score_fn: Callable[[np.ndarray], torch.Tensor],
    samples: Samples,
    *,
    mask_history: bool = False,
    ties: str = "pessimistic",
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "rank",
) -> np.ndarray:
    """Ranks of the true items of all ``samples``.

    ``score_fn(index)`` returns float scores [len(index), num_items] for the samples ``index`` (int64 array);
    it is called on consecutive chunks of ``batch_size`` so that the [B, N] matrix stays small.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(samples) == 0:
        raise ValueError(f"samples of split {samples.split!r} are empty")
    targets = samples.targets().astype(np.int64)
    out = np.empty(len(samples), dtype=np.int64)
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        index = np.arange(start, min(start + batch_size, len(samples)), dtype=np.int64)
        scores = score_fn(index)
        if scores.shape != (len(index), samples.dataset.num_items):
            raise ValueError(
                f"score_fn must return [{len(index)}, {samples.dataset.num_items}], got {tuple(scores.shape)}"
            )
        rows = items = None
        if mask_history:
            rows, items = history_mask_pairs(samples, index)
        ranks = full_ranks(
            scores.float(), torch.from_numpy(targets[index]), mask_rows=rows, mask_items=items, ties=ties
        )
        out[index] = ranks.cpu().numpy()
    return out


def write_results(
    path: str | Path,
    *,
    ranks: np.ndarray,
    mask_history: bool,
    split: str,
    dataset: str,
    model: str,
    config: dict[str, Any],
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one evaluation as JSON (metrics, the protocol that produced them, raw ranks); return the dict.

    The masking flag and tie rule sit next to the metrics because they change the numbers a lot
    (docs/method.md §5); raw ranks let any other K or metric be recomputed without re-running the model.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    result: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "model": model,
        "mask_history": bool(mask_history),
        "ties": ties,
        "ks": [int(k) for k in ks],
        "num_samples": int(len(ranks)),
        "metrics": ranking_metrics(ranks, ks),
        "config": config,
    }
    if extra:
        result.update(extra)
    # metrics indented for people, ranks on one line so that the file stays short
    head = json.dumps(result, indent=1)
    text = head[: head.rfind("}")].rstrip() + ',\n "ranks": ' + json.dumps(ranks.tolist()) + "\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    result["ranks"] = ranks.tolist()
    return result


def format_metrics(metrics: dict[str, float], ks: Sequence[int] = (10, 20)) -> str:
    """One line such as ``HR@10 0.1234  NDCG@10 0.0567 ...`` for logs."""
    return "  ".join(f"{name}@{k} {metrics[f'{name}@{k}']:.4f}" for k in ks for name in ("HR", "NDCG"))
