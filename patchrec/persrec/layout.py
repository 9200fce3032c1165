"""Where PerSRec's rows go and which earlier rows each block of rows may attend to (METHOD.md §6).

A sequence is cut into **blocks** of consecutive rows: an optional shared prefix (the LLM's instruction
text), one block per old-history segment (its items followed by its k personalization tokens T), and a final
block (the recent items, plus the LLM's prompt suffix and answer). Within a block attention is causal; across
blocks a block sees only the **carried** rows of earlier blocks of its sequence: all of the prefix, and the
last k rows (the T tokens) of each earlier segment, never the old items themselves. That is METHOD §6's rule,
and it makes the carried rows' keys/values a per-user state: once computed from the old history they are all
a later block needs.

So one layer's attention is a single ``varlen_attention`` call with no dense mask: every block is a query
sequence whose keys are ``[cached state][carried rows of earlier blocks][its own rows]``, gathered by
``BlockLayout.key_index``, with bottom-right causal alignment (own rows causal, everything before them
visible). Gradients reach the carried rows through the gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


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

    num_context = int(context_rows.sum())
    context_start = _offsets(context_rows)[:-1]
    block_start = _offsets(block_rows)[:-1] + num_context  # into cat(context, rows)
    carried_start = block_start + block_rows - carried_rows
    # Keys of block b: its sequence's context, the carried rows of the earlier blocks of its sequence, then
    # its own rows. Carried rows before b within the sequence: an exclusive cumulative sum restarted per
    # sequence.
    first_block = np.searchsorted(block_seq, block_seq, side="left")  # first block of b's sequence
    carried_before = _offsets(carried_rows)
    earlier = carried_before[np.arange(nb)] - carried_before[first_block]  # carried rows of earlier blocks
    ctx = context_rows[block_seq]
    key_count = ctx + earlier + block_rows
    cu_k = _offsets(key_count)

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
        cu_q=t(_offsets(block_rows).astype(np.int32)),
        max_q=int(block_rows.max(initial=1)),
        key_index=t(key_index),
        cu_k=t(cu_k.astype(np.int32)),
        max_k=int(key_count.max(initial=1)),
        state_index=t(state_index),
        cu_state=t(_offsets(state_count)),
    )


def num_segments(lengths: np.ndarray, segment: int) -> np.ndarray:
    """Old-history segments of a history of ``n`` items: full segments of ``segment`` items from the oldest,
    leaving 1..segment recent items (the newest item always answers, so the final block is never empty)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    if np.any(lengths < 1):
        raise ValueError("every history needs >= 1 item")
    return (lengths - 1) // segment


@dataclass
class ItemRows:
    """Rows of packed item sequences with PerSRec tokens inserted (the ID models' input).

    Sequence s of ``n`` items becomes ``[seg 1][T_1..T_k] ... [seg S][T_1..T_k][recent]`` with S =
    ``num_segments(n)``; rows of a sequence are numbered from 0 and that number is the row's position.
    """

    num_rows: int
    item_row: np.ndarray  # int64 [N]: the row of every input item (packed item order)
    token_row: np.ndarray  # int64 [M]: the rows of the T tokens
    token_slot: np.ndarray  # int64 [M]: which of the k learnable vectors each T row is
    positions: np.ndarray  # int64 [R]: row index inside its sequence (the state's rows keep theirs)
    cu_rows: np.ndarray  # int64 [B+1]: rows of each sequence
    layout: BlockLayout
    # rows whose input is a carried memory vector (the rolling layout), in the order the vectors are given
    memory_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def item_rows(
    lengths: np.ndarray,
    segment: int,
    tokens: int,
    *,
    first_position: np.ndarray | None = None,
    context_rows: np.ndarray | None = None,
    final_block: bool = True,
) -> ItemRows:
    """Rows and attention layout of item sequences of ``lengths`` with ``tokens`` T tokens per segment.

    ``final_block`` False: every sequence must be whole segments, possibly none (a state being built or
    extended; a sequence of 0 items keeps its context as its state), each ending with its T tokens; True:
    the last 1..segment items form the final block. ``first_position`` (per sequence) numbers the rows from
    there (a sequence continuing a cached state); ``context_rows`` per sequence is the cached state it
    attends to.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if final_block:
        segs = num_segments(lengths, segment)
    else:
        if segment < 1 or np.any(lengths < 0) or np.any(lengths % segment):
            raise ValueError(f"without a final block, sequences must be whole segments of {segment} items")
        segs = lengths // segment
    b = len(lengths)
    recent = lengths - segs * segment
    # Blocks per sequence: its segments, then the final block when there are recent items.
    has_final = recent > 0
    blocks_per_seq = segs + has_final
    block_seq = np.repeat(np.arange(b), blocks_per_seq)
    within = ragged_arange(blocks_per_seq)
    is_segment = within < segs[block_seq]
    block_items = np.where(is_segment, segment, recent[block_seq])
    block_rows = block_items + np.where(is_segment, tokens, 0)
    carried = np.where(is_segment, tokens, 0)
    layout = block_layout(block_rows, carried, block_seq, b, context_rows)

    rows_per_seq = lengths + segs * tokens
    cu_rows = _offsets(rows_per_seq)
    block_start = _offsets(block_rows)[:-1]
    item_row = np.repeat(block_start, block_items) + ragged_arange(block_items)
    token_blocks = np.flatnonzero(is_segment)
    token_row = np.repeat(block_start[token_blocks] + segment, tokens) + np.tile(
        np.arange(tokens, dtype=np.int64), len(token_blocks)
    )
    token_slot = np.tile(np.arange(tokens, dtype=np.int64), len(token_blocks))
    positions = ragged_arange(rows_per_seq)
    if first_position is not None:
        positions = positions + np.repeat(np.asarray(first_position, dtype=np.int64), rows_per_seq)
    return ItemRows(int(cu_rows[-1]), item_row, token_row, token_slot, positions, cu_rows, layout)


def block_rows(
    block_seq: np.ndarray,
    num_seqs: int,
    *,
    memory: np.ndarray,
    items: np.ndarray,
    tokens: np.ndarray,
    carried: np.ndarray,
    memory_position: np.ndarray,
    item_position: np.ndarray,
    token_position: np.ndarray,
    context_rows: np.ndarray | None = None,
) -> ItemRows:
    """Rows of blocks ``[memory rows][items][T tokens]`` packed back to back (the window and rolling
    layouts; every argument but ``num_seqs`` and ``context_rows`` is per block).

    Block b has ``memory[b]`` memory rows at positions ``memory_position[b] + 0, 1, ...``, ``items[b]`` item
    rows from ``item_position[b]`` and ``tokens[b]`` T rows from ``token_position[b]``; its last
    ``carried[b]`` rows are visible to the later blocks of its sequence (``block_layout``). Token slots
    count 0..tokens[b]-1 in every block.
    """
    block_seq = np.asarray(block_seq, dtype=np.int64)
    memory, items, tokens, carried = (np.asarray(a, dtype=np.int64) for a in (memory, items, tokens, carried))
    block_n = memory + items + tokens
    layout = block_layout(block_n, carried, block_seq, num_seqs, context_rows)
    start = _offsets(block_n)[:-1]
    memory_row = np.repeat(start, memory) + ragged_arange(memory)
    item_row = np.repeat(start + memory, items) + ragged_arange(items)
    token_slot = ragged_arange(tokens)
    token_row = np.repeat(start + memory + items, tokens) + token_slot
    positions = np.empty(int(block_n.sum()), dtype=np.int64)
    memory_position = np.asarray(memory_position, dtype=np.int64)
    positions[memory_row] = np.repeat(memory_position, memory) + ragged_arange(memory)
    positions[item_row] = np.repeat(np.asarray(item_position, dtype=np.int64), items) + ragged_arange(items)
    positions[token_row] = np.repeat(np.asarray(token_position, dtype=np.int64), tokens) + token_slot
    rows_per_seq = np.bincount(block_seq, weights=block_n, minlength=num_seqs).astype(np.int64)
    return ItemRows(int(block_n.sum()), item_row, token_row, token_slot, positions, _offsets(rows_per_seq),
                    layout, memory_row)  # fmt: skip
