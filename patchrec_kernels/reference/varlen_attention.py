"""Pure-PyTorch reference for attention over packed variable-length sequences.

Eager and readable on purpose: it is the ground truth the fused backends (flash-attn, torch varlen) are
tested against, and the fallback on CPU. Sequences that fit in one query block are batched with the other
sequences of the same (queries, keys) lengths, so thousands of short sequences (catalog titles at
evaluation) cost a few batched einsums rather than a Python iteration each; a longer sequence is walked in
blocks of queries. Neither a dense [T, T] block-diagonal mask nor an [L, L] score matrix for a huge sequence
is ever built. It trusts its inputs: the public ``patchrec_kernels.varlen_attention`` validates them.
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
    """Attention of one block of queries of a sequence to all keys of that sequence.

    q_blk [..., Hkv, G, Bq, D]; k_seq / v_seq [..., Hkv, Lk, D], where the optional leading dimension
    batches sequences of equal lengths; ``first_query`` is the block's offset inside its sequence (of
    ``num_queries`` queries). Returns out [..., Hkv, G, Bq, D] and lse [..., Hkv, G, Bq].
    """
    scores = torch.einsum("...hgqd,...hkd->...hgqk", q_blk, k_seq) * scale
    if causal:
        num_keys = k_seq.shape[-2]
        # Bottom-right alignment (flash-attn >= 2.1): query i sees keys j <= i + Lk - Lq, which is the
        # usual lower triangle when Lq == Lk.
        rows = torch.arange(first_query, first_query + q_blk.shape[-2], device=scores.device)
        cols = torch.arange(num_keys, device=scores.device)
        visible = cols[None, :] <= rows[:, None] + (num_keys - num_queries)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A query that sees no key has lse = -inf; subtracting it would give exp(-inf + inf) = NaN. Using 0
    # there instead makes every probability exp(-inf) = 0, hence an output of 0. The gradient through the
    # masked scores is cut by masked_fill, so no NaN reaches q or k either.
    lse_finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - lse_finite[..., None])
    out = torch.einsum("...hgqk,...hkd->...hgqd", probs, v_seq)
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

    def queries(rows: torch.Tensor) -> torch.Tensor:  # [..., L] rows -> [..., Hkv, G, L, D]
        picked = q[rows].to(compute_dtype)
        picked = picked.reshape(*rows.shape, num_heads_kv, group, head_dim)
        return picked.movedim(-4, -2)

    def keys(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [..., L] rows -> [..., Hkv, L, D]
        return x[rows].to(compute_dtype).movedim(-3, -2)

    # Results are collected per piece with the query rows they belong to, then put back in row order.
    row_pieces: list[torch.Tensor] = []
    out_pieces: list[torch.Tensor] = []
    lse_pieces: list[torch.Tensor] = []

    def collect(rows: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
        row_pieces.append(rows.reshape(-1))
        out_pieces.append(out_blk.movedim(-2, -4).reshape(-1, num_heads_q, head_dim))
        lse_pieces.append(lse_blk.movedim(-1, -3).reshape(-1, num_heads_q))

    buckets: dict[tuple[int, int], list[int]] = {}
    for b in range(len(q_bounds) - 1):
        num_queries = q_bounds[b + 1] - q_bounds[b]
        num_keys = k_bounds[b + 1] - k_bounds[b]
        if num_queries == 0:
            continue
        if num_queries <= query_chunk:
            buckets.setdefault((num_queries, num_keys), []).append(b)
            continue
        # A long sequence: blocks of queries against all its keys.
        q_rows = torch.arange(q_bounds[b], q_bounds[b + 1], device=q.device)
        k_rows = torch.arange(k_bounds[b], k_bounds[b + 1], device=q.device)
        q_seq, k_seq, v_seq = queries(q_rows), keys(k, k_rows), keys(v, k_rows)
        rows = max(1, min(query_chunk, _MAX_SCORE_ELEMENTS // max(1, num_heads_q * num_keys)))
        for first in range(0, num_queries, rows):
            out_blk, lse_blk = _attend_block(
                q_seq[..., first : first + rows, :], k_seq, v_seq, first, num_queries, causal, scale
            )
            collect(q_rows[first : first + rows], out_blk, lse_blk)

    for (num_queries, num_keys), seqs in buckets.items():
        # As many equal-length sequences per einsum as keep the scores under the element cap.
        per_call = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads_q * num_queries * num_keys))
        for first in range(0, len(seqs), per_call):
            chosen = seqs[first : first + per_call]
            q_rows = torch.tensor([q_bounds[b] for b in chosen], device=q.device)[:, None]
            q_rows = q_rows + torch.arange(num_queries, device=q.device)
            k_rows = torch.tensor([k_bounds[b] for b in chosen], device=q.device)[:, None]
            k_rows = k_rows + torch.arange(num_keys, device=q.device)
            out_blk, lse_blk = _attend_block(
                queries(q_rows), keys(k, k_rows), keys(v, k_rows), 0, num_queries, causal, scale
            )
            collect(q_rows, out_blk, lse_blk)

    if not row_pieces:  # no query at all (T == 0); keep the autograd link to q so callers can still backprop
        out = q[:0].clone()
        lse = q.new_zeros((0, num_heads_q), dtype=torch.float32)
    else:
        order = torch.argsort(torch.cat(row_pieces))
        out = torch.cat(out_pieces)[order].to(q.dtype)
        lse = torch.cat(lse_pieces)[order].to(torch.float32)
    if return_lse:
        return out, lse
    return out
