"""PerSRec on the ID sequence models (SASRec, HSTU): rows with T tokens, the full forward, and the cached
per-user state (fold whole old segments once, then answer from the recent items only).

A model opts in with a ``persrec: PersrecConfig`` attribute (``tokens`` 0 = off) and two methods:

- ``embed_rows(items, rows: ItemRows) -> x [R, d]``: input rows, item embeddings at ``rows.item_row`` and the
  learnable T vectors at ``rows.token_row`` (plus whatever position signal the model uses);
- ``run_layers(x, positions, layout, state) -> (hidden [R, d], keys, values)``: every layer under
  ``segmented_attention(..., context_k=state.keys[l], context_v=state.values[l])``; ``keys`` / ``values`` are
  each layer's [R, H, Dh] key/value rows (what the state keeps of the carried rows). A model whose attention
  reads key positions (HSTU's relative bias) takes them from ``state.positions`` and ``positions``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from patchrec.data.dataset import Samples, gather_ragged
from patchrec.persrec.attention import block_state
from patchrec.persrec.layout import BlockLayout, ItemRows, item_rows, num_segments


@dataclass
class PersrecConfig:
    tokens: int = 0  # k learnable personalization tokens after each old segment (0 = PerSRec off)
    segment: int = 50  # items per old-history segment (the released configs: k = 4)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"persrec tokens must be >= 0, got {self.tokens}")
        if self.tokens and self.segment < 1:
            raise ValueError(f"persrec segment must be >= 1, got {self.segment}")

    def rows_for(self, items: int) -> int:
        """Rows (items + T tokens) of a history of ``items`` items: the position table's size."""
        if not self.tokens:
            return items
        return items + self.tokens * int(num_segments(np.array([max(items, 1)]), self.segment)[0])


@dataclass
class PersrecState:
    """Per-user PerSRec state of B users: every layer's keys/values at the carried rows folded so far (the
    T-token rows; on the LLM also the prompt prefix, keys after RoPE: ``patchrec.persrec.llm``).

    User ``b``'s rows are ``cu_state[b] : cu_state[b+1]`` of every tensor; ``next_position[b]`` is the
    position of the user's next row (the rows consumed so far), so that a later block continues the row
    numbering of the full forward.
    """

    keys: list[torch.Tensor]  # per layer [S, Hkv, Dh]
    values: list[torch.Tensor]  # per layer [S, Hkv, Dh]
    positions: torch.Tensor  # int64 [S]: the rows' positions
    cu_state: np.ndarray  # int64 [B+1]
    next_position: np.ndarray  # int64 [B]

    @property
    def num_users(self) -> int:
        return len(self.next_position)

    def rows(self) -> np.ndarray:
        return np.diff(self.cu_state)

    def nbytes(self) -> np.ndarray:
        """Bytes of each user's state (keys and values of every layer), int64 [B]."""
        per_row = sum(t[:1].nelement() * t.element_size() for t in self.keys + self.values)
        return self.rows() * per_row

    @classmethod
    def empty(cls, model, num_users: int, device: torch.device | str = "cpu") -> PersrecState:
        heads, head_dim = model.kv_shape
        layers = model.num_layers
        blank = lambda: torch.zeros(0, heads, head_dim, device=device)  # noqa: E731
        return cls(
            [blank() for _ in range(layers)], [blank() for _ in range(layers)],
            torch.zeros(0, dtype=torch.long, device=device), np.zeros(num_users + 1, dtype=np.int64),
            np.zeros(num_users, dtype=np.int64),
        )  # fmt: skip


def _check_model(model) -> PersrecConfig:
    config = getattr(model, "persrec", None)
    if config is None or not config.tokens:
        raise ValueError(f"{type(model).__name__} was built without PerSRec tokens (persrec tokens = 0)")
    return config


def _lengths_of(cu_seqlens: torch.Tensor) -> np.ndarray:
    return cu_seqlens.detach().cpu().long().diff().numpy()


def forward_rows(
    model, items: torch.Tensor, rows: ItemRows, state: PersrecState | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run ``model`` on ``rows`` (optionally continuing ``state``): hidden [R, d] and per-layer k/v rows."""
    device = items.device
    layout = rows.layout.to(device)
    positions = torch.from_numpy(rows.positions).to(device)
    x = model.embed_rows(items, rows)
    return model.run_layers(x, positions, layout, state)


def persrec_hidden(model, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The full (uncached) forward: hidden states at the item rows [T, d], in ``items``' order."""
    config = _check_model(model)
    rows = item_rows(_lengths_of(cu_seqlens), config.segment, config.tokens)
    hidden, _, _ = forward_rows(model, items, rows)
    return hidden.index_select(0, torch.from_numpy(rows.item_row).to(items.device))


def _new_state(
    state: PersrecState, layout: BlockLayout, keys, values, positions: torch.Tensor, rows_per_user: np.ndarray
) -> PersrecState:
    return PersrecState(
        [block_state(k, layout, ck) for k, ck in zip(keys, state.keys, strict=True)],
        [block_state(v, layout, cv) for v, cv in zip(values, state.values, strict=True)],
        block_state(positions, layout, state.positions),
        layout.cu_state.numpy().copy(),
        state.next_position + rows_per_user,
    )


def fold_segments(
    model, state: PersrecState | None, items: torch.Tensor, lengths: np.ndarray
) -> PersrecState:
    """Fold whole old segments into each user's state: ``items`` packed per user (``lengths[b]`` a multiple
    of the segment, 0 = nothing new for that user). Returns the extended state (a new object)."""
    config = _check_model(model)
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
    return _new_state(state, rows.layout, keys, values, positions, np.diff(rows.cu_rows))


def recent_hidden(model, state: PersrecState, items: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """Hidden state [B, d] after each user's recent items (1..segment of them) read against ``state``."""
    config = _check_model(model)
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


def cached_scorer(model, samples: Samples) -> Callable[[np.ndarray], torch.Tensor]:
    """``score_fn`` for ``rank_samples`` through the cached path: each sample's state from its old segments,
    then the recent items against it (equal to the full forward; ``tests/test_persrec_models.py``)."""
    config = _check_model(model)
    flat = samples.dataset.items.astype(np.int64)
    device = next(model.parameters()).device

    def score(index: np.ndarray) -> torch.Tensor:
        lengths = samples.history_lengths[index]
        old, recent = split_history(lengths, config.segment)
        start = samples.hist_start[index]
        old_items = torch.from_numpy(gather_ragged(flat, start, old)).to(device)
        recent_items = torch.from_numpy(gather_ragged(flat, start + old, recent)).to(device)
        with torch.no_grad():
            state = fold_segments(model, None, old_items, old)
            return model.logits(recent_hidden(model, state, recent_items, recent))

    return score


class CachedUser:
    """One user served from a cached PerSRec state, as interactions arrive (the incremental API).

    The user holds the state of their folded segments and the pending recent items (1..segment of them once
    any exist). ``add`` appends interactions and folds every full segment that is no longer among the recent
    items; ``scores`` ranks the catalog from the state and the recent items only. After any sequence of
    ``add`` calls the scores equal the full forward over the whole history (``tests/test_persrec_models.py``).
    Rows keep their position in the whole history, so the history must fit the model's position table
    (``config.max_len`` items); a longer one is a ``ValueError`` naming the table.

        user = CachedUser(model, history)      # or CachedUser(model) for a new user
        user.add([item])                       # a new interaction: folds a segment when one is complete
        top = user.scores().topk(20).indices
    """

    def __init__(self, model, items=()) -> None:
        self.config = _check_model(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.state = PersrecState.empty(model, 1, self.device)
        self.recent = torch.zeros(0, dtype=torch.long, device=self.device)
        self.add(items)

    def add(self, items) -> None:
        """Append interactions (item ids, oldest first); fold the full segments leaving the recent block."""
        new = torch.as_tensor(items, dtype=torch.long, device=self.device).reshape(-1)
        if new.numel() and (int(new.min()) < 0 or int(new.max()) >= self.model.num_items):
            raise ValueError(f"items must be ids in [0, {self.model.num_items})")
        pending = torch.cat([self.recent, new])
        old, _ = split_history(np.array([max(len(pending), 1)]), self.config.segment)
        fold = int(old[0]) if len(pending) else 0
        if fold:
            with torch.no_grad():
                self.state = fold_segments(self.model, self.state, pending[:fold], np.array([fold]))
        self.recent = pending[fold:]

    @property
    def state_bytes(self) -> int:
        return int(self.state.nbytes()[0])

    def scores(self) -> torch.Tensor:
        """Scores of every catalog item for the user's next interaction, [num_items]."""
        if not len(self.recent):
            raise ValueError("the user has no interactions yet: add some before asking for scores")
        with torch.no_grad():
            hidden = recent_hidden(self.model, self.state, self.recent, np.array([len(self.recent)]))
            return self.model.logits(hidden)[0]
