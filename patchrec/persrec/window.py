"""PerSRec's window layout (the paper's released setup): ``[old window][T_1..T_k][recent]``.

A history of n items (at most P + R: the model reads the newest P + R) keeps its newest ``min(n, R)`` items
as the recent block and the up-to-P items before them as the old window; the k T tokens follow the old
window. Attention: old items see earlier old items; T tokens see the old window and earlier T tokens;
recent items see the T tokens and earlier recent items, never the old items. So the T rows' keys/values
(k rows per layer) are the whole per-user state.

As in the official code (facebookresearch/PerSRec, ``PersonalizedHSTU``), which left-pads every sequence to
P + R items and inserts the tokens at slot P, positions are the slots of that fixed-length array: old item i
of n_old sits at ``P - n_old + i``, token j at ``P + j``, recent item j of n_rec at ``P + k + R - n_rec + j``
(the newest item is always at ``P + k + R - 1``); padding slots are simply absent here (packed rows, no
padding). A user with at most R items has an empty old window: the k tokens still exist and see only each
other (the official code's tokens see only the padding-masked slots and themselves). The official code trains
the last old item to predict the first token's embedding (its targets are the inputs shifted by one after the
tokens are inserted); here every item row, old or recent, predicts the next item.

The state is exact only for the old window it was built from: every new interaction moves one item from the
recent block into the old window (and, past P + R items, one out of it), so a server refolds the state every
m interactions and serves in between from a stale state with a fresh recent block (the staleness study in
``patchrec.persrec.staleness`` measures what that costs).
"""

from __future__ import annotations

import numpy as np
import torch

from patchrec.batching.persrec_layouts import PersrecConfig, window_split
from patchrec.persrec.layout import ItemRows, block_rows
from patchrec.persrec.state import PersrecState, extend_state, forward_rows


def _old_blocks(old: np.ndarray, config: PersrecConfig) -> dict[str, np.ndarray]:
    k, p = config.tokens, config.window
    b = len(old)
    return dict(memory=np.zeros(b), items=old, tokens=np.full(b, k), carried=np.full(b, k),
                memory_position=np.zeros(b), item_position=p - old, token_position=np.full(b, p))  # fmt: skip


def _recent_blocks(recent: np.ndarray, config: PersrecConfig) -> dict[str, np.ndarray]:
    k, p, r = config.tokens, config.window, config.recent
    b = len(recent)
    zeros = np.zeros(b)
    return dict(memory=zeros, items=recent, tokens=zeros, carried=zeros, memory_position=zeros,
                item_position=p + k + r - recent, token_position=zeros)  # fmt: skip


def window_rows(lengths: np.ndarray, config: PersrecConfig) -> ItemRows:
    """Rows of whole histories (1..P + R items each): the old block (old items + T rows) then the recent
    block, per sequence."""
    old, recent = window_split(lengths, config)
    b = len(old)
    first, second = _old_blocks(old, config), _recent_blocks(recent, config)
    merged = {key: np.stack([first[key], second[key]], 1).reshape(-1) for key in first}
    return block_rows(np.repeat(np.arange(b), 2), b, **merged)


def window_state_rows(old: np.ndarray, config: PersrecConfig) -> ItemRows:
    """Rows that build a state: each sequence's old window (0..P items) and its k T rows."""
    old = np.asarray(old, dtype=np.int64)
    if np.any(old < 0) or np.any(old > config.window):
        raise ValueError(f"old windows must hold 0..{config.window} items")
    return block_rows(np.arange(len(old)), len(old), **_old_blocks(old, config))


def window_recent_rows(recent: np.ndarray, config: PersrecConfig) -> ItemRows:
    """Rows of the recent blocks (1..R items each) read against a state of k rows per sequence."""
    recent = np.asarray(recent, dtype=np.int64)
    if np.any(recent < 1) or np.any(recent > config.recent):
        raise ValueError(f"recent blocks must hold 1..{config.recent} items")
    b = len(recent)
    return block_rows(np.arange(b), b, context_rows=np.full(b, config.tokens),
                      **_recent_blocks(recent, config))  # fmt: skip


def window_fold(model, items: torch.Tensor, old: np.ndarray) -> PersrecState:
    """The state (k T rows per layer) of each user's old window: ``old[b]`` items (0..P) packed in
    ``items``."""
    old = np.asarray(old, dtype=np.int64)
    rows = window_state_rows(old, model.persrec)
    _, keys, values = forward_rows(model, items, rows)
    positions = torch.from_numpy(rows.positions).to(items.device)
    empty = PersrecState.empty(model, len(old), items.device)
    return extend_state(empty, rows.layout, keys, values, positions, np.diff(rows.cu_rows))


def window_recent(model, state: PersrecState, items: torch.Tensor, recent: np.ndarray) -> torch.Tensor:
    """Hidden state [B, d] after each user's recent block (1..R items) read against their state."""
    recent = np.asarray(recent, dtype=np.int64)
    if state.num_users != len(recent):
        raise ValueError(f"recent has {len(recent)} users, the state {state.num_users}")
    rows = window_recent_rows(recent, model.persrec)
    hidden, _, _ = forward_rows(model, items, rows, state)
    return hidden.index_select(0, torch.from_numpy(rows.cu_rows[1:] - 1).to(items.device))
