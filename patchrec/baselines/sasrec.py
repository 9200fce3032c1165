"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) on packed sequences.

Learned item and position embeddings, ``num_blocks`` blocks of causal self-attention and a point-wise
feed-forward network (each with layer norm, dropout and a residual), a final layer norm, and scores = dot
product of the last hidden state with the (shared) item embeddings. Sequences are packed back to back with
``cu_seqlens`` offsets and no padding; attention is ``varlen_attention`` (block-diagonal causal), so a
sequence never attends to another and no compute goes to padding.

Differences from the released TF code, on purpose:
- positions count from the start of each sequence (0 = oldest item read), as in the LLM stack, instead of
  the slot in a left-padded array; the newest item's position therefore tells the model how long the
  history is, and training (every prefix of a window) and evaluation (last position) see the same thing;
- pre-norm blocks with queries, keys and values all from the normalised input (the TF code normalises the
  queries only), the common and more stable form; attention has an output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from patchrec_kernels.varlen_attention import varlen_attention


@dataclass
class SASRecConfig:
    hidden: int = 64  # d, item/position embedding and model width (paper: 50; 64 is the common choice)
    num_blocks: int = 2  # self-attention blocks (paper: 2)
    num_heads: int = 1  # attention heads (paper: 1; more did not help); hidden % num_heads == 0
    dropout: float = 0.2  # on embeddings, attention output and FFN (paper: 0.2 on MovieLens-1M)
    max_len: int = 100  # L, longest sequence read; the position table has this many rows


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.hidden
        self.num_heads = config.num_heads
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        # point-wise FFN: the paper's two 1x1 convolutions are two Linear layers, width d -> d -> d
        self.ffn = nn.Sequential(
            nn.Linear(d, d),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(d, d),
            nn.Dropout(config.dropout),
        )
        self.dropout = nn.Dropout(config.dropout)

    def attention(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Causal multi-head self-attention of packed ``x`` [T, d]."""
        t, d = x.shape
        h = self.num_heads
        q = self.q_proj(x).view(t, h, d // h)
        k = self.k_proj(x).view(t, h, d // h)
        v = self.v_proj(x).view(t, h, d // h)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        return self.out_proj(out.reshape(t, d))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attn_norm(x), cu_seqlens, max_seqlen))
        return x + self.ffn(self.ffn_norm(x))


class SASRec(nn.Module):
    def __init__(self, num_items: int, config: SASRecConfig | None = None) -> None:
        super().__init__()
        config = config or SASRecConfig()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if config.hidden < 1 or config.num_heads < 1 or config.hidden % config.num_heads:
            raise ValueError(
                f"config.hidden ({config.hidden}) must be a positive multiple of config.num_heads "
                f"({config.num_heads})"
            )
        if config.num_blocks < 0 or config.max_len < 1 or not 0.0 <= config.dropout < 1.0:
            raise ValueError("config needs num_blocks >= 0, max_len >= 1 and dropout in [0, 1)")
        self.config = config
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items, config.hidden)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.hidden, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-normal on every matrix, as the reference implementations do; biases and norms stay default
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.xavier_normal_(p)

    def positions(self, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
        """Position of each packed token inside its own sequence (restarting at 0), [T] int64."""
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        return torch.arange(total, device=cu.device) - torch.repeat_interleave(
            cu[:-1], lengths, output_size=total
        )

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Hidden states [T, d] of packed sequences.

        items: int [T], the item ids of all sequences back to back.
        cu_seqlens: int32 [B+1], sequence ``b`` is ``items[cu_seqlens[b]:cu_seqlens[b+1]]``.
        max_seqlen: the longest sequence, at most ``config.max_len``.
        """
        if items.ndim != 1:
            raise ValueError(f"items must be 1-D [T], got shape {tuple(items.shape)}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != items.numel():
            raise ValueError("cu_seqlens must be 1-D [B+1] ending at len(items)")
        if max_seqlen > self.config.max_len:
            raise ValueError(f"max_seqlen ({max_seqlen}) exceeds config.max_len ({self.config.max_len})")
        cu_seqlens = cu_seqlens.to(device=items.device, dtype=torch.int32)
        # sqrt(d) scaling of item embeddings as in the paper's code, so positions do not dominate them
        x = self.item_emb(items) * math.sqrt(self.config.hidden)
        x = self.emb_dropout(x + self.pos_emb(self.positions(cu_seqlens, items.numel())))
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item, [..., num_items]: shared item embeddings as the output layer."""
        return hidden @ self.item_emb.weight.T
