"""Realistic packed shapes for the benches: ML-1M titles tokenised with Llama-3, laid out by PFT plans.

A history is a list of items, each a title (its Llama-3 token ids). A plan turns it into output rows, each a
list of segments, each a list of token ids (see docs/docs/method.md §2-3):
- text item: one row per token (one segment of one token);
- item patch: one row, one segment (the title);
- session patch: one row, one segment per item of the group.
Only the history part of a prompt is laid out: it is what the patch_embed op sees change between plans.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from machine import SHARED

from patchrec.batching.plan import ITEM, SESSION, TEXT, pft_i_plan, pft_s_plan

ML1M_TITLES = SHARED / "data" / "patchrec" / "ml-1m" / "id2title.txt"
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3"
LLAMA3_VOCAB = 128256

Rows = list[list[list[int]]]  # rows -> segments -> token ids
Piece = tuple[str, list[tuple[int, ...]]]  # ("text" | "item" | "session", the titles it covers)


@functools.lru_cache(maxsize=1)
def ml1m_title_tokens() -> tuple[tuple[int, ...], ...]:
    """Llama-3 token ids of every ML-1M title (``id||title`` lines), without special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA3_TOKENIZER))
    titles = [line.split("||", 1)[1] for line in ML1M_TITLES.read_text().splitlines() if "||" in line]
    return tuple(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in titles)


def plan_pieces(
    history: list[tuple[int, ...]], plan: str, *, text_items: int = 5, group: int = 5
) -> list[Piece]:
    """Pieces of one history (oldest item first) under ``plan`` ("pft_i" or "pft_s"), oldest first.

    The grouping comes from ``patchrec.batching.plan``, so the bench lays out exactly what training packs.
    """
    if plan == "pft_i":
        layout = pft_i_plan(len(history), text_items)
    elif plan == "pft_s":
        layout = pft_s_plan(len(history), group)
    else:
        raise ValueError(f"plan must be 'pft_i' or 'pft_s', got {plan!r}")
    names = {TEXT: "text", ITEM: "item", SESSION: "session"}
    pieces: list[Piece] = []
    for piece in np.unique(layout.group):
        members = np.flatnonzero(layout.group == piece)
        pieces.append((names[int(layout.kinds[members[0]])], [history[i] for i in members]))
    return pieces


def pieces_to_rows(pieces: list[Piece]) -> Rows:
    rows: Rows = []
    for kind, titles in pieces:
        if kind == "text":
            rows += [[[token]] for token in titles[0]]
        else:
            rows.append([list(title) for title in titles])
    return rows


@dataclass
class PackedBatch:
    """A packed batch in patch_embed's layout, plus the per-sample rows the eager loop baseline walks."""

    token_ids: torch.Tensor  # [T] int64
    seg_offsets: torch.Tensor  # [S + 1] int64
    row_offsets: torch.Tensor  # [R + 1] int64
    samples: list[list[Piece]]  # per sample, its pieces in row order

    def to(self, device) -> PackedBatch:
        move = lambda t: t.to(device)
        return PackedBatch(move(self.token_ids), move(self.seg_offsets), move(self.row_offsets), self.samples)

    def info(self) -> dict:
        return {
            "samples": len(self.samples),
            "tokens": self.token_ids.numel(),
            "segments": self.seg_offsets.numel() - 1,
            "rows": self.row_offsets.numel() - 1,
            "distinct_ids": int(self.token_ids.unique().numel()),
        }


def packed_history_batch(plan: str, *, num_samples: int, history: int = 100, seed: int = 0) -> PackedBatch:
    """``num_samples`` histories of ``history`` random (seeded) ML-1M items, packed under ``plan``."""
    titles = ml1m_title_tokens()
    rng = np.random.default_rng(seed)
    histories = [[titles[i] for i in rng.integers(0, len(titles), size=history)] for _ in range(num_samples)]
    samples = [plan_pieces(h, plan) for h in histories]
    rows = [row for sample in samples for row in pieces_to_rows(sample)]
    segments = [seg for row in rows for seg in row]
    return PackedBatch(
        token_ids=torch.tensor([t for seg in segments for t in seg], dtype=torch.int64),
        seg_offsets=torch.tensor(
            np.concatenate([[0], np.cumsum([len(s) for s in segments])]), dtype=torch.int64
        ),
        row_offsets=torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]), dtype=torch.int64),
        samples=samples,
    )
