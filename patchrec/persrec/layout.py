"""Where PerSRec's rows go in the ID models' packed sequences (``ItemRows``): item rows, T-token rows,
memory rows, their positions and the attention blocks (``patchrec.batching.blocks.BlockLayout``).

The ``segments`` layout (``item_rows``): an item sequence is ``[segment 1][T_1..T_k] ... [segment S][T_1..T_k]
[recent]``; each block is a segment with its T rows (carried: every later block sees them), then the recent
items, which never see the old items. That is PerSRec's rule, and it makes the carried rows' keys/values a
per-user state. ``block_rows`` builds the rows of the other layouts (``patchrec.persrec.window``,
``patchrec.persrec.rolling``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patchrec.batching.blocks import BlockLayout, block_layout, offsets
from patchrec.batching.persrec_layouts import num_segments
from patchrec.data.dataset import ragged_arange


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
    cu_rows = offsets(rows_per_seq)
    block_start = offsets(block_rows)[:-1]
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
    start = offsets(block_n)[:-1]
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
    return ItemRows(int(block_n.sum()), item_row, token_row, token_slot, positions, offsets(rows_per_seq),
                    layout, memory_row)  # fmt: skip


__all__ = ["BlockLayout", "ItemRows", "block_layout", "block_rows", "item_rows", "num_segments"]
