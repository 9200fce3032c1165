"""What SASRec and HSTU share at their input: the packed-batch checks and the PerSRec input rows."""

from __future__ import annotations

import math

import numpy as np
import torch

from patchrec.persrec.layout import ItemRows


def check_packed(items: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, max_len: int) -> np.ndarray:
    """Validate packed item sequences (``items`` [T], ``cu_seqlens`` [B+1] from 0 to T, every sequence
    non-empty, ``max_seqlen`` covering the longest and at most ``max_len``); returns the lengths."""
    if items.ndim != 1:
        raise ValueError(f"items must be 1-D [T], got shape {tuple(items.shape)}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != items.numel():
        raise ValueError("cu_seqlens must be 1-D [B+1] ending at len(items)")
    lengths = cu_seqlens.detach().cpu().long().diff().numpy()
    if int(cu_seqlens[0]) != 0 or np.any(lengths < 1):
        raise ValueError("cu_seqlens must start at 0 and every sequence needs >= 1 item")
    if max_seqlen > max_len or int(lengths.max()) > max_seqlen:
        raise ValueError(
            f"max_seqlen ({max_seqlen}) must cover the longest sequence ({int(lengths.max())}) and be at "
            f"most config.max_len ({max_len})"
        )
    return lengths


def embed_item_rows(model, items: torch.Tensor, rows: ItemRows) -> torch.Tensor:
    """PerSRec input rows of an ID model with ``item_emb``, ``token_emb`` (the T vectors), ``pos_emb`` and
    ``emb_dropout``: item embeddings times sqrt(d) (as the SASRec and HSTU code scale them, so that positions
    do not dominate), the T vectors, plus the rows' position embeddings."""
    device = items.device
    hidden = model.item_emb.embedding_dim
    x = model.item_emb.weight.new_zeros(rows.num_rows, hidden)
    x = x.index_copy(0, torch.from_numpy(rows.item_row).to(device), model.item_emb(items) * math.sqrt(hidden))
    tokens = model.token_emb(torch.from_numpy(rows.token_slot).to(device))
    x = x.index_copy(0, torch.from_numpy(rows.token_row).to(device), tokens)
    positions = torch.from_numpy(rows.positions).to(device)
    if positions.numel() and int(positions.max()) >= model.pos_emb.num_embeddings:
        raise ValueError(
            f"row position {int(positions.max())} exceeds the position table "
            f"({model.pos_emb.num_embeddings} rows, config.max_len {model.config.max_len} items)"
        )
    return model.emb_dropout(x + model.pos_emb(positions))
