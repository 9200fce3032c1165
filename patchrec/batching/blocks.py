"""Which earlier rows each block of rows may attend to: the attention layout of PerSRec's packed sequences
(used by the packer, the model's attention plans and the ID models alike).

A sequence is cut into **blocks** of consecutive rows. Within a block attention is causal; across blocks a
block sees only the **carried** rows of earlier blocks of its sequence (e.g. all of the LLM's prompt prefix,
and the k T rows of each old segment, never the old items themselves), plus an optional cached context (a
per-user state). So one layer's attention is a single ``varlen_attention`` call with no dense mask: every
block is a query sequence whose keys are ``[cached state][carried rows of earlier blocks][its own rows]``,
gathered by ``BlockLayout.key_index``, with bottom-right causal alignment (own rows causal, everything before
them visible). Gradients reach the carried rows through the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchrec.data.dataset import ragged_arange


@dataclass
class BlockLayout:
    """Attention layout of a packed batch of blocked sequences (see the module docstring).

    Row indices in ``key_index`` and ``state_index`` point into ``cat([context, rows])``: the cached state
    rows handed in (``context_rows`` per sequence, sequence-major) followed by the batch's own rows.
    """

    cu_q: torch.Tensor  # int32 [NB+1]: block b is rows cu_q[b] .. cu_q[b+1]-1 of the batch
    max_q: int
    key_index: torch.Tensor  # int64 [K]: the keys of every block back to back
    cu_k: torch.Tensor  # int32 [NB+1]: block b's keys are key_index[cu_k[b] : cu_k[b+1]]
    max_k: int
    state_index: torch.Tensor  # int64 [S]: each sequence's state after the batch (context + carried rows)
    cu_state: torch.Tensor  # int64 [B+1]: sequence s's state rows are state_index[cu_state[s]:cu_state[s+1]]

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(
            self.cu_q.to(device), self.max_q, self.key_index.to(device), self.cu_k.to(device), self.max_k,
            self.state_index.to(device), self.cu_state.to(device),
        )  # fmt: skip


def offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _checked(block_rows, carried_rows, block_seq, num_seqs: int, context_rows) -> tuple[np.ndarray, ...]:
    """``block_layout``'s arrays as int64, or ``ValueError`` naming what is wrong with them."""
    block_rows = np.asarray(block_rows, dtype=np.int64)
    carried_rows = np.asarray(carried_rows, dtype=np.int64)
    block_seq = np.asarray(block_seq, dtype=np.int64)
    if context_rows is None:
        context_rows = np.zeros(num_seqs, np.int64)
    context_rows = np.asarray(context_rows, dtype=np.int64)
    nb = len(block_rows)
    if carried_rows.shape != (nb,) or block_seq.shape != (nb,) or context_rows.shape != (num_seqs,):
        raise ValueError("block_rows, carried_rows and block_seq must be [NB], context_rows [num_seqs]")
    if np.any(block_rows < 1) or np.any(carried_rows < 0) or np.any(carried_rows > block_rows):
        raise ValueError("every block needs >= 1 row and 0 <= carried_rows <= block_rows")
    if nb and (np.any(np.diff(block_seq) < 0) or block_seq[0] < 0 or block_seq[-1] >= num_seqs):
        raise ValueError(f"block_seq must be non-decreasing in [0, {num_seqs})")
    if np.any(context_rows < 0):
        raise ValueError("context_rows must be >= 0")
    return block_rows, carried_rows, block_seq, context_rows


def block_layout(
    block_rows: np.ndarray,
    carried_rows: np.ndarray,
    block_seq: np.ndarray,
    num_seqs: int,
    context_rows: np.ndarray | None = None,
) -> BlockLayout:
    """The ``BlockLayout`` of blocks packed back to back.

    block_rows: int [NB] rows of each block, blocks in row order, a sequence's blocks consecutive.
    carried_rows: int [NB] the last ``carried_rows[b]`` rows of block b are visible to the later blocks of
        its sequence (and are part of its state).
    block_seq: int [NB] the sequence of each block, non-decreasing, in [0, num_seqs).
    context_rows: int [num_seqs] cached state rows of each sequence, visible to all of its blocks (default 0).
    """
    block_rows, carried_rows, block_seq, context_rows = _checked(block_rows, carried_rows, block_seq,
                                                                 num_seqs, context_rows)  # fmt: skip
    nb = len(block_rows)
    num_context = int(context_rows.sum())
    context_start = offsets(context_rows)[:-1]
    block_start = offsets(block_rows)[:-1] + num_context  # into cat(context, rows)
    carried_start = block_start + block_rows - carried_rows
    # Keys of block b: its sequence's context, the carried rows of the earlier blocks of its sequence, then
    # its own rows. Carried rows before b within the sequence: an exclusive cumulative sum restarted per
    # sequence.
    first_block = np.searchsorted(block_seq, block_seq, side="left")  # first block of b's sequence
    carried_before = offsets(carried_rows)
    earlier = carried_before[np.arange(nb)] - carried_before[first_block]  # carried rows of earlier blocks
    ctx = context_rows[block_seq]
    key_count = ctx + earlier + block_rows
    cu_k = offsets(key_count)

    # Every key as (block, slot): slots < ctx are context rows, then earlier blocks' carried rows, then own.
    slot = ragged_arange(key_count)
    block_of_key = np.repeat(np.arange(nb), key_count)
    key_index = np.empty(int(key_count.sum()), dtype=np.int64)
    in_ctx = slot < ctx[block_of_key]
    key_index[in_ctx] = context_start[block_seq[block_of_key[in_ctx]]] + slot[in_ctx]
    own_from = (ctx + earlier)[block_of_key]
    in_own = slot >= own_from
    key_index[in_own] = block_start[block_of_key[in_own]] + slot[in_own] - own_from[in_own]
    # Carried rows of earlier blocks: the k-th one of the sequence's concatenated carried rows.
    in_carried = ~in_ctx & ~in_own
    carried_rows_flat = np.repeat(carried_start, carried_rows) + ragged_arange(carried_rows)
    key_block = block_of_key[in_carried]
    nth = carried_before[first_block[key_block]] + slot[in_carried] - ctx[key_block]
    key_index[in_carried] = carried_rows_flat[nth]

    # State after the batch: context rows then every block's carried rows, per sequence.
    seq_carried = np.bincount(block_seq, weights=carried_rows, minlength=num_seqs).astype(np.int64)
    state_count = context_rows + seq_carried
    state_slot = ragged_arange(state_count)
    seq_of_state = np.repeat(np.arange(num_seqs), state_count)
    seq_first_block = np.searchsorted(block_seq, np.arange(num_seqs), side="left")
    state_index = np.empty(int(state_count.sum()), dtype=np.int64)
    from_ctx = state_slot < context_rows[seq_of_state]
    state_index[from_ctx] = context_start[seq_of_state[from_ctx]] + state_slot[from_ctx]
    nth = carried_before[seq_first_block[seq_of_state[~from_ctx]]] + (
        state_slot[~from_ctx] - context_rows[seq_of_state[~from_ctx]]
    )
    state_index[~from_ctx] = carried_rows_flat[nth]

    t = torch.from_numpy
    return BlockLayout(
        cu_q=t(offsets(block_rows).astype(np.int32)),
        max_q=int(block_rows.max(initial=1)),
        key_index=t(key_index),
        cu_k=t(cu_k.astype(np.int32)),
        max_k=int(key_count.max(initial=1)),
        state_index=t(state_index),
        cu_state=t(offsets(state_count)),
    )
