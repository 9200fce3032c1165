"""PerSRec on the LLM (the ``persrec`` plan): prompt encoding for exact ranking and beam search, with and
without a cached per-user state.

A persrec prompt (``patchrec.batching.pack``) is
``[prefix][segment 1 + T rows] ... [segment S + T rows][final]``, where the final block holds the recent
items and the prompt suffix, and the answer (or a catalog title being scored) continues the final block.
What the final block and its continuations see is the **state**: every layer's keys/values of the prefix rows
and of all T rows (``BlockLayout.state_index``), never the old items.

- ``encode_full`` (``--persrec-cache off``): the whole prompt in one pass with PerSRec's block attention;
  the continuations' keys are then gathered from it (state rows + final rows).
- ``encode_cached`` (``--persrec-cache on``): ``encode_state`` runs the prefix and the old segments once and
  keeps only the state (``PersrecState``: O(prefix + S x k) rows per layer, whatever the segments' length);
  ``encode_final`` then runs only the final block against that state. The two give the same scores.

``encode_state`` also folds new full segments into an existing state (pass it as ``context``), which is how a
state is kept up to date when interactions arrive. ``encode_with_state`` reads a batch's final blocks against
states given from outside (a server's stored states, ``patchrec.serve``).

Every pass is the model's own decoder call (``PackedDecoder.decode``) with a ``BlockPlan`` made from a
``BlockLayout`` (``patchrec.model.attention``): the state enters as the plan's per-layer context keys/values
and what the next pass needs (the new state, or the keys a continuation reads) is what the plan keeps. Another
layout plugs in the same way: build its ``BlockLayout`` (and context), never a decoder of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchrec.batching.blocks import BlockLayout, block_layout
from patchrec.batching.packed import PackedBatch
from patchrec.batching.persrec_layouts import PersrecConfig, old_items
from patchrec.data.dataset import ragged_arange
from patchrec.model.attention import BlockPlan, PromptCache
from patchrec.persrec.attention import block_state
from patchrec.persrec.sequence import PersrecState

CACHE_MODES = ("on", "off")


@dataclass(frozen=True)
class Blocks:
    """The blocks of a persrec batch as numpy arrays (from its layout's ``cu_q`` and ``block_carried``)."""

    rows: np.ndarray  # int64 [NB]
    carried: np.ndarray  # int64 [NB]
    seq: np.ndarray  # int64 [NB], sequence of each block
    start: np.ndarray  # int64 [NB], first row of each block in the batch
    final: np.ndarray  # bool [NB], the last block of its sequence

    @classmethod
    def of(cls, batch: PackedBatch) -> Blocks:
        if batch.layout is None or batch.block_carried is None:
            raise ValueError("not a persrec batch (no block layout): pack it with the persrec plan")
        cu_q = batch.layout.cu_q.cpu().numpy().astype(np.int64)
        cu_seq = batch.cu_seqlens.cpu().numpy().astype(np.int64)
        seq = np.searchsorted(cu_seq, cu_q[:-1], side="right") - 1
        final = np.r_[seq[1:] != seq[:-1], True] if len(seq) else np.zeros(0, dtype=bool)
        carried = batch.block_carried.cpu().numpy().astype(np.int64)
        return cls(np.diff(cu_q), carried, seq, cu_q[:-1], final)

    def row_index(self, which: np.ndarray) -> np.ndarray:
        """Rows of the blocks selected by the boolean mask ``which``, in order."""
        return np.repeat(self.start[which], self.rows[which]) + ragged_arange(self.rows[which])


def encode_state(
    model,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    layout: BlockLayout,
    *,
    next_position: np.ndarray,
    context: PersrecState | None = None,
) -> PersrecState:
    """Run rows made only of carried blocks (the prefix and / or whole old segments, each ending in its T
    rows) against an optional earlier ``context`` state; returns the new state (context rows first, then the
    carried rows of these blocks, per sequence: ``layout.state_index``)."""
    plan = BlockPlan.of_layout(layout, context_keys=None if context is None else context.keys,
                               context_values=None if context is None else context.values,
                               keep=layout.state_index)  # fmt: skip
    model.decode(embeds, position_ids, plan)
    positions = block_state(position_ids, layout, None if context is None else context.positions)
    return PersrecState(plan.keys, plan.values, positions, layout.cu_state.cpu().numpy(),
                        np.asarray(next_position))  # fmt: skip


def encode_final(
    model,
    state: PersrecState,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    final_rows: np.ndarray,
    *,
    lengths: torch.Tensor,
    sample_ids: torch.Tensor,
) -> PromptCache:
    """Run each sequence's final block (``final_rows[q]`` rows, packed in order) against its state; the cache
    keys of a continuation are the state rows followed by the final block's rows."""
    device = embeds.device
    q = len(final_rows)
    layout = block_layout(final_rows, np.zeros(q, dtype=np.int64), np.arange(q), q,
                          context_rows=state.rows()).to(device)  # fmt: skip
    plan = BlockPlan.of_layout(layout, context_keys=state.keys, context_values=state.values,
                               keep=layout.key_index)  # fmt: skip
    hidden = model.decode(embeds, position_ids, plan)
    last = layout.cu_q[1:].long() - 1
    return PromptCache(
        keys=plan.keys, values=plan.values, cu_seqlens=layout.cu_k, max_seqlen=layout.max_k, lengths=lengths,
        first_logprobs=model.logprobs(hidden.index_select(0, last)), sample_ids=sample_ids,
    )  # fmt: skip


def encode_full(model, batch: PackedBatch) -> PromptCache:
    """``--persrec-cache off``: the whole prompt in one pass; a continuation sees its final block's keys."""
    blocks = Blocks.of(batch)
    layout = batch.layout
    cu_k = layout.cu_k.cpu().numpy().astype(np.int64)
    final = np.flatnonzero(blocks.final)
    counts = cu_k[final + 1] - cu_k[final]
    pick = np.repeat(cu_k[final], counts) + ragged_arange(counts)
    pick = torch.as_tensor(pick, device=layout.key_index.device)
    final_keys = layout.key_index.index_select(0, pick)  # rows of the batch: no context here
    cu = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    plan = BlockPlan.of_layout(layout, keep=final_keys)
    hidden = model.decode(model.embed(batch), batch.position_ids, plan)
    last = batch.cu_seqlens[1:].long() - 1
    return PromptCache(
        keys=plan.keys, values=plan.values,
        cu_seqlens=torch.as_tensor(cu.astype(np.int32), device=last.device),
        max_seqlen=int(counts.max(initial=1)), lengths=batch.cu_seqlens.diff().long(),
        first_logprobs=model.logprobs(hidden.index_select(0, last)), sample_ids=batch.sample_ids,
    )  # fmt: skip


def split_state(model, batch: PackedBatch) -> tuple[PersrecState, torch.Tensor, torch.Tensor, np.ndarray]:
    """The state of every sequence of a persrec prompt batch from its prefix and old segments (one pass over
    those rows only), and the final blocks' input rows: (state, final embeddings, their positions, final rows
    per sequence)."""
    blocks = Blocks.of(batch)
    device = batch.position_ids.device
    embeds = model.embed(batch)
    old = blocks.row_index(~blocks.final)
    fin = blocks.row_index(blocks.final)
    nseq = batch.num_sequences
    old_layout = block_layout(blocks.rows[~blocks.final], blocks.carried[~blocks.final],
                              blocks.seq[~blocks.final], nseq).to(device)  # fmt: skip
    old_t, fin_t = torch.as_tensor(old, device=device), torch.as_tensor(fin, device=device)
    old_rows = np.bincount(blocks.seq[~blocks.final], blocks.rows[~blocks.final], minlength=nseq)
    next_position = old_rows.astype(np.int64)  # bincount with weights counts in float
    state = encode_state(model, embeds.index_select(0, old_t), batch.position_ids.index_select(0, old_t),
                         old_layout, next_position=next_position)  # fmt: skip
    final_embeds, final_positions = embeds.index_select(0, fin_t), batch.position_ids.index_select(0, fin_t)
    return state, final_embeds, final_positions, blocks.rows[blocks.final]


def encode_cached(model, batch: PackedBatch) -> PromptCache:
    """``--persrec-cache on``: the state once from the prefix and old segments, then only the final blocks."""
    state, embeds, positions, final_rows = split_state(model, batch)
    return encode_final(model, state, embeds, positions, final_rows, lengths=batch.cu_seqlens.diff().long(),
                        sample_ids=batch.sample_ids)  # fmt: skip


def encode_with_state(model, batch: PackedBatch, state: PersrecState) -> PromptCache:
    """Each sequence's final block read against a state given for it (``state`` user q for sequence q; e.g. a
    served user's stored window state, possibly built from an older window): the batch's other blocks are
    not run, and the final rows continue the state's row numbering (``state.next_position``), as they did in
    the prompt the state was built from. With the state ``split_state`` gives for this batch it equals
    ``encode_cached``."""
    if state.num_users != batch.num_sequences:
        raise ValueError(f"state has {state.num_users} users, the batch {batch.num_sequences} sequences")
    blocks = Blocks.of(batch)
    device = batch.position_ids.device
    final_rows = blocks.rows[blocks.final]
    fin = torch.as_tensor(blocks.row_index(blocks.final), device=device)
    embeds = model.embed(batch).index_select(0, fin)
    positions = np.repeat(state.next_position, final_rows) + ragged_arange(final_rows)
    lengths = torch.as_tensor(state.next_position + final_rows, device=device)
    return encode_final(model, state, embeds, torch.as_tensor(positions, device=device), final_rows,
                        lengths=lengths, sample_ids=batch.sample_ids)  # fmt: skip


def state_rows(prefix_rows: int, lengths: np.ndarray, config: PersrecConfig) -> np.ndarray:
    """int64 state rows of histories of ``lengths`` items: the prefix block plus k T rows per old segment
    (segments layout) or k T rows in all (window layout)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if config.layout == "window":
        return np.full(len(lengths), prefix_rows + config.tokens, dtype=np.int64)
    if config.layout != "segments":
        raise ValueError(f"the {config.layout} layout keeps a memory, not key/value rows")
    return prefix_rows + old_items(config, lengths) // config.segment * config.tokens


__all__ = ["CACHE_MODES", "Blocks", "encode_cached", "encode_final", "encode_full",
           "encode_state", "encode_with_state", "split_state", "state_rows"]  # fmt: skip
