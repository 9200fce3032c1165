"""What SASRec and HSTU share at their input: the packed-batch checks, the PerSRec options and input rows."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from patchrec.batching.persrec_layouts import PersrecConfig
from patchrec.persrec.layout import ItemRows


def persrec_config_of(config) -> PersrecConfig:
    """The ``PersrecConfig`` of a SASRec / HSTU config (its ``persrec_*`` fields); the window layout reads
    exactly P + R items, so ``max_len`` must be P + R."""
    persrec = PersrecConfig(
        tokens=config.persrec_tokens, segment=config.persrec_segment, layout=config.persrec_layout,
        window=config.persrec_window, recent=config.persrec_recent, unroll=config.persrec_unroll,
    )  # fmt: skip
    if persrec.on and persrec.layout == "window" and config.max_len != persrec.window + persrec.recent:
        raise ValueError(
            f"the window layout reads persrec window + recent = {persrec.window + persrec.recent} items: "
            f"config.max_len must be that, got {config.max_len}"
        )
    return persrec


def persrec_embeddings(persrec: PersrecConfig, hidden: int) -> tuple[nn.Embedding | None, ...]:
    """(token_emb, memory_emb): PerSRec's k T vectors shared by all users (None without PerSRec, so old
    checkpoints load unchanged) and, in the rolling layout, the k vectors of the initial memory."""
    if not persrec.on:
        return None, None
    memory = nn.Embedding(persrec.tokens, hidden) if persrec.layout == "rolling" else None
    return nn.Embedding(persrec.tokens, hidden), memory


def check_packed(
    items: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, max_len: int | None
) -> np.ndarray:
    """Validate packed item sequences (``items`` [T], ``cu_seqlens`` [B+1] from 0 to T, every sequence
    non-empty, ``max_seqlen`` covering the longest and at most ``max_len``; None: any length, as the rolling
    layout reads whole timelines); returns the lengths."""
    if items.ndim != 1:
        raise ValueError(f"items must be 1-D [T], got shape {tuple(items.shape)}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != items.numel():
        raise ValueError("cu_seqlens must be 1-D [B+1] ending at len(items)")
    lengths = cu_seqlens.detach().cpu().long().diff().numpy()
    if int(cu_seqlens[0]) != 0 or np.any(lengths < 1):
        raise ValueError("cu_seqlens must start at 0 and every sequence needs >= 1 item")
    if (max_len is not None and max_seqlen > max_len) or int(lengths.max()) > max_seqlen:
        raise ValueError(
            f"max_seqlen ({max_seqlen}) must cover the longest sequence ({int(lengths.max())}) and be at "
            f"most config.max_len ({max_len})"
        )
    return lengths


def embed_item_rows(
    model, items: torch.Tensor, rows: ItemRows, memory: torch.Tensor | None = None
) -> torch.Tensor:
    """PerSRec input rows of an ID model with ``item_emb``, ``token_emb`` (the T vectors), ``pos_emb`` and
    ``emb_dropout``: item embeddings times sqrt(d) (as the SASRec and HSTU code scale them, so that positions
    do not dominate), the T vectors, the carried ``memory`` vectors [M, d] at ``rows.memory_row`` (the
    rolling layout), plus the rows' position embeddings."""
    device = items.device
    hidden = model.item_emb.embedding_dim
    x = model.item_emb.weight.new_zeros(rows.num_rows, hidden)
    x = x.index_copy(0, torch.from_numpy(rows.item_row).to(device), model.item_emb(items) * math.sqrt(hidden))
    tokens = model.token_emb(torch.from_numpy(rows.token_slot).to(device))
    x = x.index_copy(0, torch.from_numpy(rows.token_row).to(device), tokens)
    if len(rows.memory_row) != (0 if memory is None else memory.shape[0]):
        raise ValueError(f"{len(rows.memory_row)} memory rows need as many memory vectors")
    if memory is not None and len(rows.memory_row):
        x = x.index_copy(0, torch.from_numpy(rows.memory_row).to(device), memory.to(x.dtype))
    positions = torch.from_numpy(rows.positions).to(device)
    if positions.numel() and int(positions.max()) >= model.pos_emb.num_embeddings:
        raise ValueError(
            f"row position {int(positions.max())} exceeds the position table "
            f"({model.pos_emb.num_embeddings} rows, config.max_len {model.config.max_len} items)"
        )
    return model.emb_dropout(x + model.pos_emb(positions))
