"""HSTU (Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for
Generative Recommendations", ICML 2024) on packed sequences, with and without PerSRec.

One HSTU layer (the reference is ``generative_recommenders/research/modeling/sequential/hstu.py`` of
meta-recsys/generative-recommenders, the code behind the paper's sequential-recommendation tables):

    U, V, Q, K = split(SiLU(LayerNorm(X) W_uvqk))                 (one matrix, no bias)
    A = SiLU(Q K^T + rab(i - j)) / N   under the causal mask       (pointwise: no softmax, no 1/sqrt(d))
    Y = f2(Dropout(LayerNorm(A V) * U)) + X                         (f2: Linear; no feed-forward network)

``rab`` is a learned relative-position bias, one scalar per (layer, bucket of the offset query position -
key position), shared by the heads; ``N`` is a constant, the longest row sequence (``max_len`` plus the
PerSRec rows), as the reference divides by its padded length. Inputs are item embeddings times sqrt(d) plus
learned absolute position embeddings (0 = the oldest item read), with dropout (the reference's
``LearnablePositionalEmbedding`` preprocessor); the output is L2-normalised and scored against L2-normalised
item embeddings divided by a temperature (the reference's ``l2_norm`` user embeddings, ``item_l2_norm`` and
temperature 0.05).

Differences from the reference, on purpose:
- **no time bias**: our releases carry no timestamps, so only the relative *position* bias is kept (the
  reference adds a bucketed ``log |t_i - t_j|`` bias when timestamps are given);
- the position bias covers offsets >= 0 only (a key is never after its query here; the reference's table of
  2N - 1 also holds the masked future half), and offsets can be bucketed: ``position_buckets`` 0 is one
  weight per offset as in the reference (offsets past the table share its last weight), B > 0 gives B
  buckets, the first B/2 exact and the rest log-spaced up to the longest row sequence (T5-style);
- packed sequences, no padding in the API: attention runs block by block over a ``BlockLayout`` (one block
  per sequence, or PerSRec's segment blocks), ``pointwise_attention`` pads per block internally (plain
  PyTorch; the reference pads every sequence to N);
- trained by ``patchrec.baselines.train.fit``: full-catalog cross-entropy at every position and Adam, instead
  of the reference's sampled softmax with 128 negatives; the temperature is kept;
- one dropout rate, on the inputs and before ``f2`` as in the reference (whose separate attention-dropout
  rate is stored but never applied).

PerSRec (``persrec_tokens`` k > 0, docs/method.md §6): k learnable vectors follow every old segment of
``persrec_segment`` items, attention is segment-isolated (``patchrec.persrec``), positions number the rows
(items and T tokens) of a sequence, the relative bias reads the rows' positions (the cached state keeps its
rows' positions), and ``patchrec.persrec.sequence`` gives the cached per-user state: per layer the T rows'
K and V (so PerSRec needs ``attention_dim == linear_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchrec.baselines.inputs import check_packed, embed_item_rows, persrec_config_of, persrec_embeddings
from patchrec.batching.blocks import BlockLayout, block_layout
from patchrec.persrec.attention import block_keys
from patchrec.persrec.layout import ItemRows
from patchrec.persrec.sequence import persrec_hidden
from patchrec.persrec.state import PersrecState

NORM_EPS = 1e-6  # the reference's layer-norm and L2-norm epsilon


@dataclass
class HSTUConfig:
    hidden: int = 64  # d, item/position embedding and model width (reference ML-1M: 50)
    num_blocks: int = 2  # HSTU layers (reference ML-1M "large": 8)
    num_heads: int = 1  # attention heads (reference ML-1M: 2)
    dropout: float = 0.2  # on the inputs and before each layer's output projection (reference: 0.2)
    max_len: int = 100  # L, longest sequence read; the position table has this many rows (+ T tokens)
    persrec_tokens: int = 0  # PerSRec: k learnable tokens (0 = off; paper: 4)
    persrec_segment: int = 50  # PerSRec segments / rolling layouts: items per segment
    persrec_layout: str = "segments"  # PerSRec layout: segments, window or rolling (patchrec.persrec.config)
    persrec_window: int = 0  # PerSRec window layout: P old items compressed into the k tokens
    persrec_recent: int = 0  # PerSRec window layout: R recent items
    persrec_unroll: int = 0  # PerSRec rolling layout: segments the gradient reaches back through (0 = all)
    attention_dim: int = 0  # per-head Q/K size (reference dqk); 0 = hidden // num_heads
    linear_dim: int = 0  # per-head U/V size (reference dv); 0 = hidden // num_heads
    position_buckets: int = 0  # relative-position buckets; 0 = one per offset (reference), else T5-style log
    temperature: float = 0.05  # logits = cos(user, item) / temperature (reference); 0 = raw dot product


def relative_position_bucket(offset: torch.Tensor, num_buckets: int, max_offset: int) -> torch.Tensor:
    """Bucket of each offset (query position - key position, int64; negative offsets count as 0).

    ``num_buckets`` 0: one bucket per offset 0 .. max_offset - 1 (larger ones share the last). B > 0: offsets
    below B // 2 have their own bucket, the rest log-spaced up to ``max_offset``, clamped to bucket B - 1.
    """
    offset = offset.clamp(min=0)
    if num_buckets == 0:
        return offset.clamp(max=max(max_offset, 1) - 1)
    exact = max(num_buckets // 2, 1)
    if max_offset <= num_buckets or exact == num_buckets:
        return offset.clamp(max=num_buckets - 1)
    log_ratio = torch.log(offset.clamp(min=exact).double() / exact) / math.log(max_offset / exact)
    far = exact + (log_ratio * (num_buckets - exact)).long()
    return torch.where(offset < exact, offset, far.clamp(max=num_buckets - 1))


def pointwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    positions: torch.Tensor,
    *,
    scale: float,
    bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
    context_k: torch.Tensor | None = None,
    context_v: torch.Tensor | None = None,
    context_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """HSTU's pointwise attention of packed rows over a ``BlockLayout``, [R, H, Dv].

    Block b's queries are rows ``cu_q[b]:cu_q[b+1]``, its keys/values the rows of ``cat([context, rows])``
    at ``layout.key_index[cu_k[b]:cu_k[b+1]]`` (``block_keys``); query i of a block with Lq queries and Lk
    keys sees keys j <= i + Lk - Lq (bottom-right causal). Output
    ``out_i = sum_j SiLU(q_i . k_j + bias(pos_i - pos_j)) * scale * v_j``, no softmax.
    Plain PyTorch: each block is padded to ``layout.max_q`` x ``layout.max_k``.

    q, k: [R, H, Dqk]; v: [R, H, Dv]; positions: int [R], each row's position (the relative bias reads query
    minus key position); context_k / context_v / context_positions: [C, H, D] / [C] the cached state's rows.
    bias: maps int64 offsets [...] to float biases [...] (broadcast over heads); None = no bias.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("q, k and v must be [R, H, D]")
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"k must match q {tuple(q.shape)} and v its [R, H], got {tuple(k.shape)} / {tuple(v.shape)}"
        )
    if positions.shape != q.shape[:1]:
        raise ValueError(f"positions must be [R] = [{q.shape[0]}], got {tuple(positions.shape)}")
    given = [t is not None for t in (context_k, context_v, context_positions)]
    if any(given) and not all(given):
        raise ValueError("context_k, context_v and context_positions must be given together")
    if all(given) and (
        context_k.shape[1:] != k.shape[1:] or context_v.shape[1:] != v.shape[1:]
        or not context_k.shape[0] == context_v.shape[0] == context_positions.shape[0]
    ):  # fmt: skip
        raise ValueError("context_k / context_v / context_positions must be [C, H, D] like k / v and [C]")
    rows, heads = q.shape[0], q.shape[1]
    if int(layout.cu_q[-1]) != rows:
        raise ValueError(f"layout has {int(layout.cu_q[-1])} query rows, q has {rows}")
    keys = block_keys(k, layout, context_k)
    values = block_keys(v, layout, context_v)
    key_pos = block_keys(positions, layout, context_positions)

    cu_q, cu_k = layout.cu_q.long(), layout.cu_k.long()
    lk = cu_k.diff()
    extra = (q, keys, values, positions, key_pos)
    if lk.numel() == 0:
        return q.new_zeros(rows, heads, v.shape[2])
    # Blocks are padded per group of similar key lengths (powers of two), not all to the longest block: a
    # batch of histories of 5..400 items would otherwise spend most of its work on padding.
    group = torch.ceil(torch.log2(lk.clamp(min=1).double())).long()
    out = q.new_zeros(rows, heads, v.shape[2])
    for g in torch.unique(group).tolist():
        blocks = torch.nonzero(group == g).flatten()
        rows_g, out_g = _padded_blocks(*extra, cu_q, cu_k, blocks, scale, bias)
        out = out.index_copy(0, rows_g, out_g)
    return out


def _padded_blocks(q, keys, values, positions, key_pos, cu_q, cu_k, blocks, scale, bias):
    """``pointwise_attention`` of the blocks ``blocks`` padded to their longest: (their query rows, the
    output at those rows [n, H, Dv])."""
    device = q.device
    lq, lk = (cu_q[blocks + 1] - cu_q[blocks]), (cu_k[blocks + 1] - cu_k[blocks])
    max_q, max_k = int(lq.max()), int(lk.max())
    qi = torch.arange(max_q, device=device)
    kj = torch.arange(max_k, device=device)
    q_valid = qi[None] < lq[:, None]  # [G, Mq]
    k_valid = kj[None] < lk[:, None]  # [G, Mk]
    # Padded slots point at one extra zero row after the real ones.
    q_index = torch.where(q_valid, cu_q[blocks, None] + qi[None], q.shape[0])
    k_index = torch.where(k_valid, cu_k[blocks, None] + kj[None], keys.shape[0])

    def padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])[index]

    qp, kp, vp = padded(q, q_index), padded(keys, k_index), padded(values, k_index)  # [G, M, H, D]
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp)
    if bias is not None:
        offsets = padded(positions, q_index)[:, :, None] - padded(key_pos, k_index)[:, None, :]
        scores = scores + bias(offsets)[:, None]
    sees = (
        q_valid[:, :, None]
        & k_valid[:, None, :]
        & (kj[None, None] <= qi[None, :, None] + (lk - lq)[:, None, None])
    )
    weights = F.silu(scores) * sees[:, None].to(scores.dtype) * scale
    out = torch.einsum("bhij,bjhd->bihd", weights, vp)  # [G, Mq, H, Dv]
    return q_index[q_valid], out[q_valid]


class HSTULayer(nn.Module):
    def __init__(self, config: HSTUConfig, attention_dim: int, linear_dim: int, max_offset: int) -> None:
        super().__init__()
        self.hidden, self.heads = config.hidden, config.num_heads
        self.attention_dim, self.linear_dim = attention_dim, linear_dim
        self.num_buckets, self.max_offset = config.position_buckets, max_offset
        h = config.num_heads
        self.uvqk = nn.Parameter(torch.empty(config.hidden, 2 * h * (linear_dim + attention_dim)))
        self.o = nn.Linear(h * linear_dim, config.hidden)
        self.rel_bias = nn.Parameter(torch.empty(config.position_buckets or max_offset))
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.uvqk, std=0.02)  # as the reference
        nn.init.normal_(self.rel_bias, std=0.02)
        nn.init.xavier_uniform_(self.o.weight)

    def bias(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.rel_bias[relative_position_bucket(offsets, self.num_buckets, self.max_offset)]

    def uvqk_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """U [R, H*Dv], V [R, H, Dv], Q, K [R, H, Dqk] of rows ``x`` [R, d]."""
        r, h = x.shape[0], self.heads
        mixed = F.silu(F.layer_norm(x, (self.hidden,), eps=NORM_EPS) @ self.uvqk)
        u, v, q, k = mixed.split([h * self.linear_dim] * 2 + [h * self.attention_dim] * 2, dim=1)
        return u, v.reshape(r, h, -1), q.reshape(r, h, -1), k.reshape(r, h, -1)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        layout: BlockLayout,
        scale: float,
        context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer on rows ``x`` [R, d]; also returns its key/value rows (what a PerSRec state keeps)."""
        u, v, q, k = self.uvqk_of(x)
        ck, cv, cp = (None, None, None) if context is None else context
        attn = pointwise_attention(
            q, k, v, layout, positions, scale=scale, bias=self.bias,
            context_k=ck, context_v=cv, context_positions=cp,
        )  # fmt: skip
        attn = F.layer_norm(attn.reshape(x.shape[0], -1), (self.heads * self.linear_dim,), eps=NORM_EPS)
        return self.o(self.dropout(attn * u)) + x, k, v


class HSTU(nn.Module):
    def __init__(self, num_items: int, config: HSTUConfig | None = None) -> None:
        super().__init__()
        config = config or HSTUConfig()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if config.hidden < 1 or config.num_heads < 1:
            raise ValueError("config.hidden and config.num_heads must be >= 1")
        if config.attention_dim < 0 or config.linear_dim < 0:
            raise ValueError(
                "config.attention_dim and config.linear_dim must be >= 0 (0 = hidden // num_heads)"
            )
        if (not config.attention_dim or not config.linear_dim) and config.hidden % config.num_heads:
            raise ValueError(
                f"config.hidden ({config.hidden}) must be a multiple of config.num_heads "
                f"({config.num_heads}) unless config.attention_dim and config.linear_dim are given"
            )
        if config.num_blocks < 0 or config.max_len < 1 or not 0.0 <= config.dropout < 1.0:
            raise ValueError("config needs num_blocks >= 0, max_len >= 1 and dropout in [0, 1)")
        if config.position_buckets < 0:
            raise ValueError(f"config.position_buckets must be >= 0, got {config.position_buckets}")
        if config.temperature < 0:
            raise ValueError(f"config.temperature must be >= 0, got {config.temperature}")
        head = config.hidden // config.num_heads
        self.attention_dim = config.attention_dim or head
        self.linear_dim = config.linear_dim or head
        if config.persrec_tokens and self.attention_dim != self.linear_dim:
            raise ValueError(
                "PerSRec keeps keys and values in one state shape: config.attention_dim "
                f"({self.attention_dim}) must equal config.linear_dim ({self.linear_dim})"
            )
        self.config = config
        self.num_items = num_items
        self.persrec = persrec_config_of(config)
        # The longest row sequence: the position table's size, the bias's offsets and the attention's 1/N.
        self.max_rows = self.persrec.rows_for(config.max_len)
        self.item_emb = nn.Embedding(num_items, config.hidden)
        self.pos_emb = nn.Embedding(self.max_rows, config.hidden)
        self.token_emb, self.memory_emb = persrec_embeddings(self.persrec, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        dims = (self.attention_dim, self.linear_dim, self.max_rows)
        self.layers = nn.ModuleList(HSTULayer(config, *dims) for _ in range(config.num_blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the reference: truncated normal, std 0.02 for items and sqrt(1/d) for positions
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02, a=-0.04, b=0.04)
        std = math.sqrt(1.0 / self.config.hidden)
        nn.init.trunc_normal_(self.pos_emb.weight, std=std, a=-2 * std, b=2 * std)
        for table in (self.token_emb, self.memory_emb):
            if table is not None:
                nn.init.trunc_normal_(table.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Hidden states [T, d] of packed sequences (L2-normalised when ``config.temperature`` > 0).

        items: int [T], the item ids of all sequences back to back.
        cu_seqlens: int [B+1], sequence ``b`` is ``items[cu_seqlens[b]:cu_seqlens[b+1]]``.
        max_seqlen: the longest sequence, at most ``config.max_len``.
        """
        lengths = check_packed(items, cu_seqlens, max_seqlen, self.persrec.history_items(self.config.max_len))
        if self.persrec.tokens:
            return persrec_hidden(self, items, cu_seqlens)
        # Without PerSRec: the same layers with one block per sequence.
        b = len(lengths)
        layout = block_layout(lengths, np.zeros(b, np.int64), np.arange(b), b).to(items.device)
        positions = torch.from_numpy(np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        positions = positions.to(items.device)
        x = self.emb_dropout(self.item_emb(items) * math.sqrt(self.config.hidden) + self.pos_emb(positions))
        hidden, _, _ = self.run_layers(x, positions, layout, None)
        return hidden

    # --- PerSRec (patchrec.persrec.sequence) ---

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(heads, head size) of one key/value row of the state."""
        return self.config.num_heads, self.attention_dim

    def embed_rows(self, items: torch.Tensor, rows: ItemRows, memory: torch.Tensor | None = None):
        return embed_item_rows(self, items, rows, memory)

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, layout: BlockLayout, state: PersrecState | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        scale = 1.0 / self.max_rows
        for i, layer in enumerate(self.layers):
            context = None if state is None else (state.keys[i], state.values[i], state.positions)
            x, k, v = layer(x, positions, layout, scale, context)
            keys.append(k)
            values.append(v)
        return self.output(x), keys, values

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The user embedding: L2-normalised (the reference's ``l2_norm``) unless temperature is 0."""
        return F.normalize(x, dim=-1, eps=NORM_EPS) if self.config.temperature > 0 else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item, [..., num_items]: shared item embeddings as the output layer
        (L2-normalised and divided by ``config.temperature``, or a raw dot product when it is 0)."""
        if self.config.temperature == 0:
            return hidden @ self.item_emb.weight.T
        items = F.normalize(self.item_emb.weight, dim=-1, eps=NORM_EPS)
        return hidden @ items.T / self.config.temperature
