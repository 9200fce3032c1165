"""PerSRec on the ID sequence models (SASRec, HSTU): the full forward under each layout, the cached path
(state from the old history once, then the recent items only) and ``CachedUser``, a user's state kept up to
date as interactions arrive.

Layouts (``patchrec.persrec.config``): ``segments`` (this module: segments of N items from the oldest item
read, each followed by k T rows, all kept in the state), ``window`` (``patchrec.persrec.window``: one old
window compressed to k T rows) and ``rolling`` (``patchrec.persrec.rolling``: a recurrent k-vector memory
over the user's whole timeline). The model protocol is in ``patchrec.persrec.state``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from patchrec.batching.persrec_layouts import PersrecConfig, num_segments, window_split
from patchrec.data.dataset import Samples, gather_ragged
from patchrec.persrec.layout import item_rows
from patchrec.persrec.rolling import RollingState, rolling_fold, rolling_hidden, rolling_recent, rolling_split
from patchrec.persrec.state import PersrecState, extend_state, forward_rows
from patchrec.persrec.window import window_fold, window_recent, window_rows


def check_persrec_model(model) -> PersrecConfig:
    """The model's ``PersrecConfig``; ValueError when it was built without PerSRec tokens."""
    config = getattr(model, "persrec", None)
    if config is None or not config.tokens:
        raise ValueError(f"{type(model).__name__} was built without PerSRec tokens (persrec tokens = 0)")
    return config


def _lengths_of(cu_seqlens: torch.Tensor) -> np.ndarray:
    return cu_seqlens.detach().cpu().long().diff().numpy()


def persrec_hidden(model, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The full (uncached) forward under the model's layout: hidden states at the item rows [T, d], in
    ``items``' order."""
    config = check_persrec_model(model)
    lengths = _lengths_of(cu_seqlens)
    if config.layout == "rolling":
        return rolling_hidden(model, items, lengths)
    if config.layout == "window":
        rows = window_rows(lengths, config)
    else:
        rows = item_rows(lengths, config.segment, config.tokens)
    hidden, _, _ = forward_rows(model, items, rows)
    return hidden.index_select(0, torch.from_numpy(rows.item_row).to(items.device))


def fold_segments(
    model, state: PersrecState | None, items: torch.Tensor, lengths: np.ndarray
) -> PersrecState:
    """Fold whole old segments into each user's state: ``items`` packed per user (``lengths[b]`` a multiple
    of the segment, 0 = nothing new for that user). Returns the extended state (a new object)."""
    config = check_persrec_model(model)
    lengths = np.asarray(lengths, dtype=np.int64)
    if state is None:
        state = PersrecState.empty(model, len(lengths), items.device)
    if state.num_users != len(lengths):
        raise ValueError(f"lengths has {len(lengths)} users, the state {state.num_users}")
    rows = item_rows(
        lengths, config.segment, config.tokens, final_block=False,
        first_position=state.next_position, context_rows=state.rows(),
    )  # fmt: skip
    if rows.num_rows == 0:
        return state
    device = items.device
    _, keys, values = forward_rows(model, items, rows, state)
    positions = torch.from_numpy(rows.positions).to(device)
    return extend_state(state, rows.layout, keys, values, positions, np.diff(rows.cu_rows))


def recent_hidden(model, state: PersrecState, items: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """Hidden state [B, d] after each user's recent items (1..segment of them) read against ``state``."""
    config = check_persrec_model(model)
    lengths = np.asarray(lengths, dtype=np.int64)
    if np.any(lengths < 1) or np.any(lengths > config.segment):
        raise ValueError(f"recent items per user must be in [1, {config.segment}] (fold full segments first)")
    if state.num_users != len(lengths):
        raise ValueError(f"lengths has {len(lengths)} users, the state {state.num_users}")
    rows = item_rows(
        lengths, config.segment, config.tokens, first_position=state.next_position, context_rows=state.rows()
    )
    hidden, _, _ = forward_rows(model, items, rows, state)
    last = torch.from_numpy(rows.cu_rows[1:] - 1).to(items.device)
    return hidden.index_select(0, last)


def split_history(lengths: np.ndarray, segment: int) -> tuple[np.ndarray, np.ndarray]:
    """(old, recent) item counts of histories: whole segments from the oldest item, then 1..segment."""
    old = num_segments(lengths, segment) * segment
    return old, np.asarray(lengths, dtype=np.int64) - old


def split_for(config: PersrecConfig, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(old, recent) item counts under the layout: what builds the state, and what is read against it."""
    if config.layout == "window":
        return window_split(lengths, config)
    if config.layout == "rolling":
        return rolling_split(lengths, config.segment)
    return split_history(lengths, config.segment)


def build_state(model, items: torch.Tensor, old: np.ndarray):
    """The per-user state of the layout from ``old[b]`` old items each (packed in ``items``)."""
    config = check_persrec_model(model)
    if config.layout == "window":
        return window_fold(model, items, old)
    if config.layout == "rolling":
        return rolling_fold(model, None, items, old)
    return fold_segments(model, None, items, old)


def read_recent(model, state, items: torch.Tensor, recent: np.ndarray) -> torch.Tensor:
    """Hidden [B, d] after each user's recent items (packed in ``items``) read against ``state``."""
    config = check_persrec_model(model)
    if config.layout == "window":
        return window_recent(model, state, items, recent)
    if config.layout == "rolling":
        return rolling_recent(model, state, items, recent)
    return recent_hidden(model, state, items, recent)


def cached_scorer(model, samples: Samples) -> Callable[[np.ndarray], torch.Tensor]:
    """``score_fn`` for ``rank_samples`` through the cached path: each sample's state from its old history,
    then the recent items against it (equal to the full forward; ``tests/test_persrec_models.py``)."""
    config = check_persrec_model(model)
    flat = samples.dataset.items.astype(np.int64)
    device = next(model.parameters()).device

    def score(index: np.ndarray) -> torch.Tensor:
        lengths = samples.history_lengths[index]
        old, recent = split_for(config, lengths)
        start = samples.hist_start[index]
        old_items = torch.from_numpy(gather_ragged(flat, start, old)).to(device)
        recent_items = torch.from_numpy(gather_ragged(flat, start + old, recent)).to(device)
        with torch.no_grad():
            state = build_state(model, old_items, old)
            return model.logits(read_recent(model, state, recent_items, recent))

    return score


class CachedUser:
    """One user served from a cached PerSRec state, as interactions arrive (the incremental API).

    ``add(items)`` appends interactions (oldest first); ``scores()`` ranks the catalog from the state and
    the recent items only. What the state is depends on the layout:

    - ``segments``: every full segment that leaves the recent block is folded into the state, which grows by
      k rows per segment; the history must fit the model's position table (``config.max_len`` items).
    - ``window``: the state is the old window's k T rows; it is rebuilt every ``refold_every`` interactions
      (1 = after every ``add``: exact). In between, ``scores()`` reads the current recent block against the
      stale state. Only the newest P + R items are kept.
    - ``rolling``: each completed segment is folded into the k memory vectors; any history length, a
      constant-size state, always exact.

    With ``refold_every=1`` the scores equal the full forward over the same history after any sequence of
    ``add`` calls (``tests/test_persrec_models.py``, ``tests/test_persrec_layouts.py``).

        user = CachedUser(model, history)      # or CachedUser(model) for a new user
        user.add([item])
        top = user.scores().topk(20).indices
    """

    def __init__(self, model, items=(), *, refold_every: int = 1) -> None:
        self.config = check_persrec_model(model)
        if refold_every < 1:
            raise ValueError(f"refold_every must be >= 1, got {refold_every}")
        self.model = model
        self.refold_every = refold_every
        self.device = next(model.parameters()).device
        self.recent = torch.zeros(0, dtype=torch.long, device=self.device)
        self.state = None if self.config.layout == "window" else self._empty_state()
        self.since_fold = 0  # window: interactions since the state was built
        self.add(items)

    def _empty_state(self):
        if self.config.layout == "rolling":
            return RollingState.initial(self.model, 1)
        return PersrecState.empty(self.model, 1, self.device)

    @property
    def num_items(self) -> int:
        """Interactions held as items: the open/recent ones (segments, rolling) or the window (window)."""
        return len(self.recent)

    def add(self, items) -> None:
        """Append interactions (item ids, oldest first) and update the state as the layout says."""
        new = torch.as_tensor(items, dtype=torch.long, device=self.device).reshape(-1)
        if new.numel() and (int(new.min()) < 0 or int(new.max()) >= self.model.num_items):
            raise ValueError(f"items must be ids in [0, {self.model.num_items})")
        pending = torch.cat([self.recent, new])
        if self.config.layout == "window":
            self.recent = pending[-(self.config.window + self.config.recent) :]
            self.since_fold += new.numel()
            if self.state is None or self.since_fold >= self.refold_every:
                self.refold()
            return
        fold = int(split_for(self.config, np.array([max(len(pending), 1)]))[0][0]) if len(pending) else 0
        if fold:
            with torch.no_grad():
                if self.config.layout == "rolling":
                    self.state = rolling_fold(self.model, self.state, pending[:fold], np.array([fold]))
                else:
                    self.state = fold_segments(self.model, self.state, pending[:fold], np.array([fold]))
        self.recent = pending[fold:]

    def refold(self) -> None:
        """Window layout: rebuild the state from the current old window."""
        if self.config.layout != "window":
            raise ValueError(f"refold applies to the window layout, not {self.config.layout!r}")
        old, _ = window_split(np.array([max(len(self.recent), 1)]), self.config)
        count = int(old[0]) if len(self.recent) else 0
        with torch.no_grad():
            self.state = window_fold(self.model, self.recent[:count], np.array([count]))
        self.since_fold = 0

    @property
    def state_bytes(self) -> int:
        return int(self.state.nbytes()[0])

    def scores(self) -> torch.Tensor:
        """Scores of every catalog item for the user's next interaction, [num_items]."""
        if not len(self.recent):
            raise ValueError("the user has no interactions yet: add some before asking for scores")
        if self.config.layout == "window":
            _, recent = window_split(np.array([len(self.recent)]), self.config)
            items = self.recent[-int(recent[0]) :]
        else:
            items, recent = self.recent, np.array([len(self.recent)])
        with torch.no_grad():
            return self.model.logits(read_recent(self.model, self.state, items, recent))[0]


__all__ = [
    "CachedUser", "PersrecConfig", "PersrecState", "build_state", "cached_scorer", "check_persrec_model",
    "fold_segments", "persrec_hidden", "read_recent", "recent_hidden", "split_for", "split_history",
]  # fmt: skip
