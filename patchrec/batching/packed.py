"""The packed batch: what ``patchrec.batching.pack`` produces and the model reads (``patch_embed`` inputs,
varlen attention offsets, labels, and PerSRec's blocks, memory rows and fold passes)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from patchrec.batching.blocks import BlockLayout


@dataclass
class FoldPass:
    """One fold pass of a rolling-layout batch: segment j of the sequences that have it."""

    batch: PackedBatch  # one causal sequence per folded segment: [k memory rows][items][T rows], no labels
    owner: torch.Tensor  # int64 [F], the sequence of the main batch each segment belongs to
    memory_rows: torch.Tensor  # int64 [F*k], rows reading the memory (the first k of each sequence)
    write_rows: torch.Tensor  # int64 [F*k], the T rows whose final hidden states are the next memory

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FoldPass:
        return FoldPass(self.batch.to(device, non_blocking), *(t.to(device, non_blocking=non_blocking)
                        for t in (self.owner, self.memory_rows, self.write_rows)))  # fmt: skip


@dataclass
class PackedBatch:
    """One token-budget batch of Q sequences (R rows, S segments, T tokens, N labels), all torch tensors.

    ``patch_embed(E, token_ids, seg_offsets, row_offsets)`` gives the [R, D] input of the decoder; attention
    is varlen over ``cu_seqlens``; the loss reads hidden states at ``label_rows`` only.
    """

    token_ids: torch.Tensor  # int32 [T]
    seg_offsets: torch.Tensor  # int64 [S+1], token boundaries of segments
    row_offsets: torch.Tensor  # int64 [R+1], segment boundaries of rows
    cu_seqlens: torch.Tensor  # int32 [Q+1], row boundaries of sequences
    position_ids: torch.Tensor  # int64 [R], restart at 0 in every sequence
    max_seqlen: int  # rows of the longest sequence
    label_rows: torch.Tensor  # int64 [N], row whose hidden state predicts label i
    label_ids: torch.Tensor  # int64 [N], answer title tokens then eot, per sequence
    label_sample: torch.Tensor  # int64 [N], sequence (0..Q-1, index into sample_ids) of label i
    sample_ids: torch.Tensor  # int64 [Q], index into the Samples of each sequence
    view_ids: torch.Tensor  # int64 [Q], 0 = first view; pretrain: 0 all-text, 1 compressed
    hist_tokens_before: torch.Tensor  # int64 [Q], history title tokens as text (no markers, separators)
    hist_tokens_after: torch.Tensor  # int64 [Q], same after compression (a patch or session counts as 1;
    # persrec: plus the T rows)
    # persrec only: attention blocks (prefix, old segments, final) instead of one causal block per sequence
    layout: BlockLayout | None = None
    block_carried: torch.Tensor | None = None  # int64 [NB], rows of each block visible to later blocks
    # persrec rolling only: k memory rows per sequence (right after <|start_seq|>), the T ids whose embeddings
    # are the initial memory, the fold passes (segment 0, 1, ...), where the gradient is cut, and optionally
    # a memory computed elsewhere ([Q, k, D], e.g. a cached per-user state) that replaces the folds
    memory_rows: torch.Tensor | None = None  # int64 [Q*k]
    memory_ids: torch.Tensor | None = None  # int64 [k]
    folds: list[FoldPass] | None = None
    fold_unroll: int = 0  # detach the memory after every fold pass j with (j + 1) % fold_unroll == 0
    memory: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.position_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.sample_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, BlockLayout):
                value = value.to(device)
            elif f.name == "folds" and value is not None:
                value = [fold.to(device, non_blocking) for fold in value]
            moved[f.name] = value
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        if pinned["folds"] is not None:
            pinned["folds"] = [
                FoldPass(f.batch.pin_memory(), f.owner.pin_memory(), f.memory_rows.pin_memory(),
                         f.write_rows.pin_memory())
                for f in pinned["folds"]
            ]
        return PackedBatch(**{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in pinned.items()})


__all__ = ["FoldPass", "PackedBatch"]
