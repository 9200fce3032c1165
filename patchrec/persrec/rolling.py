"""PerSRec's rolling layout: a bounded per-user state for histories of any length (a recurrent memory).

A user's timeline is cut into segments of N items counted from their first interaction ever (segment j is
items ``jN .. jN + N - 1``; a segment is folded once an item after it exists, so the newest 1..N items are
always the open segment). Segment j is run as one block of rows ``[M_j][its N items][T_1..T_k]`` under plain
causal attention, where ``M_j`` is the memory: k vectors (model width d) read as input rows. The model's
final hidden states at the k T rows are the next memory ``M_{j+1}``; ``M_0`` is a learned init. The open
segment is run as ``[M_S][its 1..N items]`` and its last row scores the catalog.

Why a recurrent memory and not carried keys/values: if each segment's new k rows attended only to the
previous segment's k key/value rows *of the same layer*, information from segment j - i would have to climb
one layer per segment to reach the recent items, so the horizon would be the model's depth (one segment for
a 2-block SASRec). Here the top layer's output feeds the next segment's *input*, so every segment passes
through the whole depth again and the horizon is not bounded by the layer count (measured in
``benches/persrec_horizon.py``).

Positions never depend on how much came before: memory rows are 0..k-1, a segment's items k..k+N-1 and its
T rows k+N..k+N+k-1 in every segment (the position table has 2k + N rows). The state is the k memory vectors,
``k x d`` numbers whatever the history length.

Training unrolls a user's whole (training) timeline segment by segment, all users of a batch in lockstep
(one packed pass per segment index), with the loss on every item row; the memory is detached every
``PersrecConfig.unroll`` segments (0 = never), which changes only the gradients. Cached inference folds the
same segments with the same rule, so it equals the full forward exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchrec.batching.persrec_layouts import PersrecConfig, num_segments
from patchrec.data.dataset import ragged_arange
from patchrec.persrec.layout import ItemRows, block_rows


@dataclass
class RollingState:
    """The memory of B users: ``memory[b]`` is user b's k vectors after their ``folded[b]`` segments."""

    memory: torch.Tensor  # [B, k, d]
    folded: np.ndarray  # int64 [B], segments folded so far

    @property
    def num_users(self) -> int:
        return self.memory.shape[0]

    def nbytes(self) -> np.ndarray:
        """Bytes of each user's state (the memory vectors), int64 [B]: the same for every history length."""
        per_user = self.memory[0].nelement() * self.memory.element_size() if self.num_users else 0
        return np.full(self.num_users, per_user, dtype=np.int64)

    @classmethod
    def initial(cls, model, num_users: int) -> RollingState:
        init = model.memory_emb.weight
        return cls(init.unsqueeze(0).expand(num_users, -1, -1), np.zeros(num_users, dtype=np.int64))


def rolling_rows(items: np.ndarray, fold: np.ndarray, config: PersrecConfig) -> ItemRows:
    """Rows of one pass: per sequence ``[k memory rows][items[b] items]`` plus the k T rows when ``fold[b]``
    (then ``items[b]`` must be N)."""
    items = np.asarray(items, dtype=np.int64)
    fold = np.asarray(fold, dtype=bool)
    k, n = config.tokens, config.segment
    if np.any(items < 1) or np.any(items > n) or np.any(fold & (items != n)):
        raise ValueError(f"a rolling block holds 1..{n} items, exactly {n} when it is folded")
    b = len(items)
    zeros = np.zeros(b, dtype=np.int64)
    return block_rows(
        np.arange(b), b, memory=np.full(b, k), items=items, tokens=np.where(fold, k, 0), carried=zeros,
        memory_position=zeros, item_position=np.full(b, k), token_position=np.full(b, k + n),
    )  # fmt: skip


def _pass(model, items: torch.Tensor, memory: torch.Tensor, counts: np.ndarray, fold: np.ndarray):
    """One block per sequence: hidden at its item rows (packed in order) and, for folded ones, the next
    memory [F, k, d]."""
    config = model.persrec
    rows = rolling_rows(counts, fold, config)
    device = items.device
    x = model.embed_rows(items, rows, memory=memory.reshape(-1, memory.shape[-1]))
    positions = torch.from_numpy(rows.positions).to(device)
    hidden, _, _ = model.run_layers(x, positions, rows.layout.to(device), None)
    item_hidden = hidden.index_select(0, torch.from_numpy(rows.item_row).to(device))
    token_hidden = hidden.index_select(0, torch.from_numpy(rows.token_row).to(device))
    return item_hidden, token_hidden.reshape(-1, config.tokens, hidden.shape[-1])


def _run_segments(
    model, state: RollingState, items: torch.Tensor, lengths: np.ndarray, *, open_segment: bool
) -> tuple[torch.Tensor, RollingState, torch.Tensor | None]:
    """Run every user's ``lengths[b]`` items (packed in ``items``) segment by segment from ``state``.

    ``open_segment`` True: the last 1..N items are the open segment (not folded); False: ``lengths`` are
    whole segments, all folded. Returns (hidden at every item row in ``items``' order, the new state, hidden
    at each open segment's last row [B, d] or None)."""
    config = model.persrec
    n, unroll = config.segment, config.unroll
    lengths = np.asarray(lengths, dtype=np.int64)
    if open_segment:
        segs = num_segments(lengths, n)
        passes = segs + 1
    else:
        if np.any(lengths < 0) or np.any(lengths % n):
            raise ValueError(f"folding needs whole segments of {n} items per user")
        segs = passes = lengths // n
    device = items.device
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    memory = state.memory
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    detach = model.training and torch.is_grad_enabled() and unroll > 0
    for j in range(int(passes.max(initial=0))):
        active = np.flatnonzero(passes > j)
        fold = segs[active] > j
        counts = np.where(fold, n, lengths[active] - j * n)
        index = np.repeat(starts[active] + j * n, counts) + ragged_arange(counts)
        index_t = torch.from_numpy(index).to(device)
        item_hidden, new_memory = _pass(model, items.index_select(0, index_t), memory[active], counts, fold)
        outputs.append((index_t, item_hidden))
        if detach:
            # The segment's position on the user's timeline decides where the gradient is cut, so that a
            # resumed or batched run cuts at the same places.
            cut = (state.folded[active[fold]] + j + 1) % unroll == 0
            if cut.any():
                new_memory = torch.where(torch.from_numpy(cut).to(device)[:, None, None],
                                         new_memory.detach(), new_memory)  # fmt: skip
        if fold.any():
            memory = memory.index_copy(0, torch.from_numpy(active[fold]).to(device), new_memory)
    hidden = memory.new_zeros((items.numel(), memory.shape[-1]))
    if outputs:
        hidden = hidden.index_copy(0, torch.cat([i for i, _ in outputs]), torch.cat([h for _, h in outputs]))
    last = None
    if open_segment:
        last = hidden.index_select(0, torch.from_numpy(starts + lengths - 1).to(device))
    return hidden, RollingState(memory, state.folded + segs), last


def rolling_hidden(model, items: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """The full forward from each user's first interaction: hidden at every item row [T, d]."""
    state = RollingState.initial(model, len(lengths))
    hidden, _, _ = _run_segments(model, state, items, lengths, open_segment=True)
    return hidden


def rolling_fold(model, state: RollingState | None, items: torch.Tensor, lengths: np.ndarray) -> RollingState:
    """Fold whole segments (``lengths[b]`` a multiple of N, 0 = nothing new) into each user's memory."""
    if state is None:
        state = RollingState.initial(model, len(lengths))
    if state.num_users != len(lengths):
        raise ValueError(f"lengths has {len(lengths)} users, the state {state.num_users}")
    _, new_state, _ = _run_segments(model, state, items, lengths, open_segment=False)
    return new_state


def rolling_recent(model, state: RollingState, items: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """Hidden state [B, d] after each user's open segment (1..N items) read with their memory."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = model.persrec.segment
    if np.any(lengths < 1) or np.any(lengths > n):
        raise ValueError(f"the open segment holds 1..{n} items per user (fold full segments first)")
    if state.num_users != len(lengths):
        raise ValueError(f"lengths has {len(lengths)} users, the state {state.num_users}")
    _, _, last = _run_segments(model, state, items, lengths, open_segment=True)
    return last


def rolling_split(lengths: np.ndarray, segment: int) -> tuple[np.ndarray, np.ndarray]:
    """(folded, open) item counts of whole timelines: full segments, then the newest 1..N items."""
    lengths = np.asarray(lengths, dtype=np.int64)
    folded = num_segments(lengths, segment) * segment
    return folded, lengths - folded
