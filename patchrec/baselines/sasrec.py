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

PerSRec (``persrec_tokens`` k > 0, docs/method.md §6): k learnable vectors follow every old segment of
``persrec_segment`` items, attention is segment-isolated (``patchrec.persrec``), positions number the rows
(items and T tokens) of a sequence, and ``patchrec.persrec.sequence`` gives the cached per-user state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from patchrec.baselines.inputs import check_packed, embed_item_rows, persrec_config_of, persrec_embeddings
from patchrec.batching.blocks import BlockLayout
from patchrec.persrec.attention import segmented_attention
from patchrec.persrec.layout import ItemRows
from patchrec.persrec.sequence import persrec_hidden
from patchrec.persrec.state import PersrecState
from patchrec_kernels.varlen_attention import varlen_attention


@dataclass
class SASRecConfig:
    hidden: int = 64  # d, item/position embedding and model width (paper: 50; 64 is the common choice)
    num_blocks: int = 2  # self-attention blocks (paper: 2)
    num_heads: int = 1  # attention heads (paper: 1; more did not help); hidden % num_heads == 0
    dropout: float = 0.2  # on embeddings, attention output and FFN (paper: 0.2 on MovieLens-1M)
    max_len: int = 100  # L, longest sequence read; the position table has this many rows (+ T tokens)
    persrec_tokens: int = 0  # PerSRec: k learnable tokens (0 = off; paper: 4)
    persrec_segment: int = 50  # PerSRec segments / rolling layouts: items per segment
    persrec_layout: str = "segments"  # PerSRec layout: segments, window or rolling (patchrec.persrec.config)
    persrec_window: int = 0  # PerSRec window layout: P old items compressed into the k tokens
    persrec_recent: int = 0  # PerSRec window layout: R recent items
    persrec_unroll: int = 0  # PerSRec rolling layout: segments the gradient reaches back through (0 = all)


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

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, d = x.shape
        h = self.num_heads
        return tuple(proj(x).view(t, h, d // h) for proj in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Causal multi-head self-attention block over packed ``x`` [T, d]."""
        q, k, v = self.qkv(self.attn_norm(x))
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        x = x + self.dropout(self.out_proj(out.reshape(x.shape)))
        return x + self.ffn(self.ffn_norm(x))

    def forward_blocks(
        self, x: torch.Tensor, layout: BlockLayout, context_k=None, context_v=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block under PerSRec's segment-isolated attention; also returns its key/value rows."""
        q, k, v = self.qkv(self.attn_norm(x))
        out = segmented_attention(q, k, v, layout, context_k=context_k, context_v=context_v)
        x = x + self.dropout(self.out_proj(out.reshape(x.shape)))
        return x + self.ffn(self.ffn_norm(x)), k, v


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
        self.persrec = persrec_config_of(config)
        self.item_emb = nn.Embedding(num_items, config.hidden)
        self.pos_emb = nn.Embedding(self.persrec.rows_for(config.max_len), config.hidden)
        self.token_emb, self.memory_emb = persrec_embeddings(self.persrec, config.hidden)
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
        check_packed(items, cu_seqlens, max_seqlen, self.persrec.history_items(self.config.max_len))
        if self.persrec.tokens:
            return persrec_hidden(self, items, cu_seqlens)
        cu_seqlens = cu_seqlens.to(device=items.device, dtype=torch.int32)
        # sqrt(d) scaling of item embeddings as in the paper's code, so positions do not dominate them
        x = self.item_emb(items) * math.sqrt(self.config.hidden)
        x = self.emb_dropout(x + self.pos_emb(self.positions(cu_seqlens, items.numel())))
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen)
        return self.final_norm(x)

    # --- PerSRec (patchrec.persrec.sequence) ---

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(heads, head size) of one key/value row of the state."""
        return self.config.num_heads, self.config.hidden // self.config.num_heads

    def embed_rows(self, items: torch.Tensor, rows: ItemRows, memory: torch.Tensor | None = None):
        return embed_item_rows(self, items, rows, memory)

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, layout: BlockLayout, state: PersrecState | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            context = (None, None) if state is None else (state.keys[i], state.values[i])
            x, k, v = block.forward_blocks(x, layout, *context)
            keys.append(k)
            values.append(v)
        return self.final_norm(x), keys, values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item, [..., num_items]: shared item embeddings as the output layer."""
        return hidden @ self.item_emb.weight.T
