"""Scoring from a stale PerSRec state: the state built ``lag`` interactions before the request, the recent
block current (what a server that refolds every m interactions serves in between; the paper's decay study).

For a sample whose history ends at position t (the target is item t of the user's timeline):

- ``window``: the state is the k T rows of the old window of the history as it was at t - lag (its newest
  P + R items then, split by the window rule); the recent block is the newest min(n, R) items now.
- ``rolling``: the memory after the segments that were complete at t - lag; the open segment now is read
  against it (segments completed in between are skipped: their items are in neither). With lag = 0, or while
  no segment completes, this is the exact state.

``lag`` = 0 gives exactly the cached scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from patchrec.batching.persrec_layouts import num_segments, window_split
from patchrec.data.dataset import Samples, gather_ragged
from patchrec.persrec.rolling import rolling_fold, rolling_recent
from patchrec.persrec.sequence import check_persrec_model
from patchrec.persrec.window import window_fold, window_recent


def stale_scorer(model, samples: Samples, lag: int) -> Callable[[np.ndarray], torch.Tensor]:
    """``score_fn`` for ``rank_samples``: each sample scored from the state of ``lag`` interactions earlier
    (see the module docstring). ``samples`` must read the layout's whole history (P + R items for the window,
    the whole timeline for rolling)."""
    config = check_persrec_model(model)
    if config.layout not in ("window", "rolling"):
        raise ValueError(f"staleness applies to the window and rolling layouts, not {config.layout!r}")
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    dataset = samples.dataset
    flat = dataset.items.astype(np.int64)
    user_base = dataset.user_offsets[:-1][samples.user].astype(np.int64)
    device = next(model.parameters()).device

    def items_of(start: np.ndarray, count: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(gather_ragged(flat, start, count)).to(device)

    def score(index: np.ndarray) -> torch.Tensor:
        target, base = samples.target_index[index], user_base[index]
        built = np.maximum(target - lag, base)  # the history then ends before item `built`
        with torch.no_grad():
            if config.layout == "window":
                then_start = np.maximum(base, built - config.window - config.recent)
                then = built - then_start
                old, _ = window_split(np.maximum(then, 1), config)
                old = np.where(then > 0, old, 0)
                state = window_fold(model, items_of(then_start, old), old)
                _, recent = window_split(samples.history_lengths[index], config)
                hidden = window_recent(model, state, items_of(target - recent, recent), recent)
            else:
                n = config.segment
                folded_then = num_segments(np.maximum(built - base, 1), n) * n
                folded_then = np.where(built > base, folded_then, 0)
                state = rolling_fold(model, None, items_of(base, folded_then), folded_then)
                open_start = base + num_segments(target - base, n) * n
                hidden = rolling_recent(model, state, items_of(open_start, target - open_start),
                                        target - open_start)  # fmt: skip
            return model.logits(hidden)

    return score
