"""Plain dense references for the ID models' layers on one sequence of rows: explicit [n, n] masks, explicit
positions, one sequence at a time. The packed models (block layouts, cached states, recurrent memory) are
compared with these."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patchrec.persrec.reference import masked_attention_reference


def hstu_bucket(offset: int, num_buckets: int, max_offset: int) -> int:
    """HSTU's relative-position bucket, one offset at a time."""
    offset = max(offset, 0)
    if num_buckets == 0:
        return min(offset, max_offset - 1)
    exact = num_buckets // 2
    if offset < exact:
        return offset
    far = exact + int(math.log(offset / exact) / math.log(max_offset / exact) * (num_buckets - exact))
    return min(far, num_buckets - 1)


def hstu_dense_layer(model, layer, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """One HSTU layer on one sequence of rows x [n, d] at ``positions`` with a dense [n, n] mask."""
    n, d = x.shape
    h, dq, dv = model.config.num_heads, model.attention_dim, model.linear_dim
    y = F.silu(F.layer_norm(x, (d,), eps=1e-6) @ layer.uvqk)
    u, v, q, k = (
        y[:, : h * dv],
        y[:, h * dv : 2 * h * dv],
        y[:, 2 * h * dv : 2 * h * dv + h * dq],
        y[:, -h * dq :],
    )
    pos = positions.tolist()
    buckets = [
        [hstu_bucket(pos[i] - pos[j], model.config.position_buckets, model.max_rows) for j in range(n)]
        for i in range(n)
    ]
    rab = layer.rel_bias[torch.tensor(buckets, dtype=torch.long)]
    heads = []
    for a in range(h):
        qa, ka, va = q[:, a * dq : (a + 1) * dq], k[:, a * dq : (a + 1) * dq], v[:, a * dv : (a + 1) * dv]
        weights = F.silu(qa @ ka.T + rab) / model.max_rows * mask.to(x.dtype)
        heads.append(weights @ va)
    attn = F.layer_norm(torch.cat(heads, dim=1), (h * dv,), eps=1e-6)
    return layer.o(attn * u) + x


def hstu_dense_hidden(model, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None):
    """HSTU's output rows for input rows ``x`` (before position embeddings) at ``positions`` (default
    0..n-1)."""
    positions = torch.arange(len(x)) if positions is None else positions
    x = x + model.pos_emb(positions)
    for layer in model.layers:
        x = hstu_dense_layer(model, layer, x, mask, positions)
    return F.normalize(x, dim=-1, eps=1e-6)


def sasrec_dense_hidden(model, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """SASRec's output rows for input rows ``x`` (before position embeddings) at ``positions`` with a dense
    [n, n] boolean mask (a row that sees nothing gets a zero attention output)."""
    x = x + model.pos_emb(positions)
    cu = torch.tensor([0, len(x)])
    for block in model.blocks:
        q, k, v = block.qkv(block.attn_norm(x))
        out = masked_attention_reference(q, k, v, cu, [mask.bool()])
        x = x + block.out_proj(out.reshape(x.shape))
        x = x + block.ffn(block.ffn_norm(x))
    return model.final_norm(x)


def dense_hidden(model, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The dense reference of ``model`` (SASRec or HSTU)."""
    if hasattr(model, "blocks"):
        return sasrec_dense_hidden(model, x, mask, positions)
    return hstu_dense_hidden(model, x, mask, positions)
