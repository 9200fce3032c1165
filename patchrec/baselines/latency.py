"""Per-user inference latency of the ID models: one user at a time (batch 1), whole-catalog scores, on a
seeded random subset of the evaluation samples.

``cached`` (PerSRec models only): each user's state is built from the old segments first, outside the timer,
as a server would hold it; the timer covers the recent items read against the state and the catalog scores.
Otherwise the timer covers the forward over the whole (latest L items) history.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from patchrec.baselines.train import sample_scorer
from patchrec.data.dataset import Samples
from patchrec.persrec.sequence import build_state, read_recent, split_for


def per_user_latency(
    model, samples: Samples, count: int, *, cached: bool, warmup: int = 3, seed: int = 0
) -> dict:
    """Timing of ``count`` seeded random samples: ms per user (median, min, mean, p90; the median and min
    resist other processes sharing the CPU), mean history items, and for ``cached`` the mean state bytes."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    count = min(count, len(samples))
    chosen = np.sort(np.random.default_rng(seed).choice(len(samples), size=count, replace=False))
    model.eval()
    flat = samples.dataset.items.astype(np.int64)
    times, state_bytes = [], []
    full = sample_scorer(model, samples)
    for i in list(chosen[:warmup]) + list(chosen):
        index = np.array([i])
        if cached:
            n = samples.history_lengths[index]
            old, recent = split_for(model.persrec, n)
            start = int(samples.hist_start[i])
            with torch.no_grad():
                state = build_state(model, torch.from_numpy(flat[start : start + old[0]]), old)
            recent_items = torch.from_numpy(flat[start + old[0] : start + n[0]])
            t0 = time.perf_counter()
            with torch.no_grad():
                model.logits(read_recent(model, state, recent_items, recent))
            elapsed = time.perf_counter() - t0
            state_bytes.append(int(state.nbytes()[0]))
        else:
            t0 = time.perf_counter()
            full(index)
            elapsed = time.perf_counter() - t0
        times.append(elapsed)
    ms = np.asarray(times[min(warmup, count) :]) * 1e3
    out = {
        "users": count,
        "cached": cached,
        "ms_per_user_median": float(np.median(ms)),
        "ms_per_user_min": float(ms.min()),
        "ms_per_user_mean": float(ms.mean()),
        "ms_per_user_p90": float(np.percentile(ms, 90)),
        "history_items_mean": float(samples.history_lengths[chosen].mean()),
        "threads": torch.get_num_threads(),
    }
    if cached:
        out["state_bytes_mean"] = float(np.mean(state_bytes[min(warmup, count) :]))
    return out
