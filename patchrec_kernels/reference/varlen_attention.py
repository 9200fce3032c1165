"""Pure-PyTorch reference for attention over packed variable-length sequences.

Eager and readable on purpose: it is the ground truth the fused backends (flash-attn, torch varlen) are
tested against, and the fallback on CPU. It loops over sequences and, inside a sequence, over blocks of
queries, so neither a dense [T, T] block-diagonal mask nor an [L, L] score matrix for a huge sequence is
ever built. It trusts its inputs: the public ``patchrec_kernels.varlen_attention`` validates them.
"""

from __future__ import annotations

import math

import torch

# Queries per block. The scores of one block are [Hq, block, Lk]; besides this cap the block is shrunk so
# that they stay under _MAX_SCORE_ELEMENTS (fp32), which bounds memory for very long key sets.
QUERY_CHUNK = 512
_MAX_SCORE_ELEMENTS = 1 << 26


def _attend_block(
    q_blk: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    first_query: int,
    num_queries: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block of queries of one sequence to all keys of that sequence.

    q_blk [Hkv, G, Bq, D]; k_seq / v_seq [Hkv, Lk, D]; ``first_query`` is the block's offset inside the
    sequence (of ``num_queries`` queries). Returns out [Hkv, G, Bq, D] and lse [Hkv, G, Bq].
    """
    scores = torch.einsum("hgqd,hkd->hgqk", q_blk, k_seq) * scale
    if causal:
        num_keys = k_seq.shape[1]
        # Bottom-right alignment (flash-attn >= 2.1): query i sees keys j <= i + Lk - Lq, which is the
        # usual lower triangle when Lq == Lk.
        rows = torch.arange(first_query, first_query + q_blk.shape[2], device=scores.device)
        cols = torch.arange(num_keys, device=scores.device)
        visible = cols[None, :] <= rows[:, None] + (num_keys - num_queries)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A query that sees no key has lse = -inf; subtracting it would give exp(-inf + inf) = NaN. Using 0
    # there instead makes every probability exp(-inf) = 0, hence an output of 0. The gradient through the
    # masked scores is cut by masked_fill, so no NaN reaches q or k either.
    lse_finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - lse_finite[..., None])
    out = torch.einsum("hgqk,hkd->hgqd", probs, v_seq)
    return out, lse


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    _query_chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention within each packed sequence, computed eagerly in fp32 (fp64 for fp64 inputs).

    Shapes: q [T, Hq, D]; k, v [Tk, Hkv, D] with Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv), as flash-attn does); cu_seqlens [B+1] (0, ..., T); cu_seqlens_k [B+1] (0, ..., Tk)
    when queries attend to a different packing of keys, else the keys are packed like the queries.
    ``max_seqlen`` / ``max_seqlen_k`` are accepted for signature parity with the fused backends and unused.

    Causal masking is bottom-right aligned: query i of a sequence with Lq queries and Lk keys sees keys
    j <= i + Lk - Lq. A query that sees no key gets output 0 and lse -inf.

    Returns out [T, Hq, D] in q's dtype and, with ``return_lse``, lse [T, Hq] float32: the natural-log
    sum-exp over visible keys of the scaled scores, token-major like ``out``. Everything is differentiable
    by plain autograd.
    """
    del max_seqlen, max_seqlen_k
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_heads_q, head_dim = q.shape[1], q.shape[2]
    num_heads_kv = k.shape[1]
    group = num_heads_q // num_heads_kv
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    query_chunk = QUERY_CHUNK if _query_chunk is None else _query_chunk

    # The reference runs on the host's schedule anyway, so reading the offsets here is fine.
    q_bounds = cu_seqlens.tolist()
    k_bounds = q_bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()

    out_blocks: list[torch.Tensor] = []
    lse_blocks: list[torch.Tensor] = []
    for b in range(len(q_bounds) - 1):
        q_start, q_end = q_bounds[b], q_bounds[b + 1]
        k_start, k_end = k_bounds[b], k_bounds[b + 1]
        num_queries, num_keys = q_end - q_start, k_end - k_start
        if num_queries == 0:
            continue
        # [Lk, Hkv, D] -> [Hkv, Lk, D]; GQA keeps kv heads unrepeated and groups query heads instead.
        k_seq = k[k_start:k_end].to(compute_dtype).transpose(0, 1)
        v_seq = v[k_start:k_end].to(compute_dtype).transpose(0, 1)
        q_seq = q[q_start:q_end].to(compute_dtype).reshape(num_queries, num_heads_kv, group, head_dim)
        q_seq = q_seq.permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]

        rows = max(1, min(query_chunk, _MAX_SCORE_ELEMENTS // max(1, num_heads_q * num_keys)))
        for first in range(0, num_queries, rows):
            out_blk, lse_blk = _attend_block(
                q_seq[:, :, first : first + rows], k_seq, v_seq, first, num_queries, causal, scale
            )
            count = out_blk.shape[2]
            out_blocks.append(out_blk.permute(2, 0, 1, 3).reshape(count, num_heads_q, head_dim))
            lse_blocks.append(lse_blk.permute(2, 0, 1).reshape(count, num_heads_q))

    if out_blocks:
        out = torch.cat(out_blocks).to(q.dtype)
        lse = torch.cat(lse_blocks).to(torch.float32)
    else:  # no query at all (T == 0); keep the autograd link to q so callers can still backprop
        out = q[:0].clone()
        lse = q.new_zeros((0, num_heads_q), dtype=torch.float32)
    if return_lse:
        return out, lse
    return out
