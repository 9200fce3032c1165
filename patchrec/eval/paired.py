"""Differences between two rankings of the same samples, with paired uncertainty.

Two models ranked on the same test samples are compared sample by sample: the per-sample metric values
(HR@K: 1 when the rank is below K; NDCG@K: 1 / log2(rank + 2) then) are subtracted pairwise, and the
difference's standard error and bootstrap interval come from those per-sample differences. That is much
tighter than treating the two means as independent, and it is the only honest error bar for "row A vs row
B" in a table. Several seeds of one configuration are averaged per sample first.
"""

from __future__ import annotations

import re

import numpy as np

_METRIC = re.compile(r"^(HR|NDCG)@(\d+)$")


def per_sample(ranks, metric: str) -> np.ndarray:
    """float64 [N] per-sample values of ``metric`` ("HR@K" or "NDCG@K") for 0-based ``ranks`` [N]."""
    match = _METRIC.match(metric)
    if match is None:
        raise ValueError(f"metric must be HR@K or NDCG@K, got {metric!r}")
    ranks = np.asarray(ranks, dtype=np.float64)
    k = int(match.group(2))
    hit = ranks < k
    if match.group(1) == "HR":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def seed_mean(rank_lists, metric: str) -> np.ndarray:
    """Per-sample ``metric`` averaged over several runs (seeds) ranking the same samples, [N]."""
    values = [per_sample(r, metric) for r in rank_lists]
    if not values or len({len(v) for v in values}) != 1:
        raise ValueError("every run must rank the same samples (equal, non-zero counts)")
    return np.mean(values, axis=0)


def paired_difference(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of ``a - b`` over paired per-sample values, its standard error (sd of the differences /
    sqrt(N)) and a percentile bootstrap interval over samples."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a and b must be paired 1-D arrays of >= 2 samples, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {
        "a_mean": float(a.mean()),
        "b_mean": float(b.mean()),
        "diff": float(diff.mean()),
        "se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": int(len(diff)),
    }
