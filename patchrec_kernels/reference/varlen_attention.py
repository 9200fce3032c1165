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


def _masked_scores(
    q_blk: torch.Tensor, k_seq: torch.Tensor, first_query: int, num_queries: int, causal: bool, scale: float
) -> torch.Tensor:
    """Scaled scores of one block, [..., Hkv, G, Bq, Lk], -inf where a query may not see a key."""
    scores = torch.einsum("...hgqd,...hkd->...hgqk", q_blk, k_seq) * scale
    if causal:
        num_keys = k_seq.shape[-2]
        # Bottom-right alignment (flash-attn >= 2.1): query i sees keys j <= i + Lk - Lq, which is the
        # usual lower triangle when Lq == Lk.
        rows = torch.arange(first_query, first_query + q_blk.shape[-2], device=scores.device)
        cols = torch.arange(num_keys, device=scores.device)
        visible = cols[None, :] <= rows[:, None] + (num_keys - num_queries)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # A query that sees no key has lse = -inf; subtracting it would give exp(-inf + inf) = NaN. Using 0
    # there instead makes every probability exp(-inf) = 0, hence an output (and gradients) of 0.
    lse_finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - lse_finite[..., None])


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
    scores = _masked_scores(q_blk, k_seq, first_query, num_queries, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("...hgqk,...hkd->...hgqd", _probabilities(scores, lse), v_seq)
    return out, lse


def _attend_block_backward(
    q_blk, k_seq, v_seq, lse_blk, grad_blk, first_query, num_queries, causal, scale
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block from its forward's lse (softmax's backward with the probabilities
    recomputed): dq [..., Hkv, G, Bq, D], dk / dv [..., Hkv, Lk, D] summed over the block's queries."""
    scores = _masked_scores(q_blk, k_seq, first_query, num_queries, causal, scale)
    probs = _probabilities(scores, lse_blk)
    grad_v = torch.einsum("...hgqk,...hgqd->...hkd", probs, grad_blk)
    grad_probs = torch.einsum("...hgqd,...hkd->...hgqk", grad_blk, v_seq)
    # Softmax backward: dS = P * (dP - sum_k P dP). The row sum is taken from P and dP rather than from the
    # (rounded) output, so the gradient is the one autograd gives for the forward above.
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    grad_q = torch.einsum("...hgqk,...hkd->...hgqd", grad_scores, k_seq) * scale
    grad_k = torch.einsum("...hgqk,...hgqd->...hkd", grad_scores, q_blk) * scale
    return grad_q, grad_k, grad_v


def _pieces(q_bounds: list[int], k_bounds: list[int], num_heads_q: int, query_chunk: int, device):
    """The reference's unit of work: (query rows [..., Bq], key rows [..., Lk], first query, queries).

    Sequences that fit in one query block come batched with the other sequences of the same (queries, keys)
    lengths (a leading dimension), as many per piece as keep the scores under the element cap; a longer
    sequence comes as blocks of its queries against all its keys. Every query row is in exactly one piece.
    """
    buckets: dict[tuple[int, int], list[int]] = {}
    for b in range(len(q_bounds) - 1):
        num_queries = q_bounds[b + 1] - q_bounds[b]
        num_keys = k_bounds[b + 1] - k_bounds[b]
        if num_queries == 0:
            continue
        if num_queries <= query_chunk:
            buckets.setdefault((num_queries, num_keys), []).append(b)
            continue
        q_rows = torch.arange(q_bounds[b], q_bounds[b + 1], device=device)
        k_rows = torch.arange(k_bounds[b], k_bounds[b + 1], device=device)
        rows = max(1, min(query_chunk, _MAX_SCORE_ELEMENTS // max(1, num_heads_q * num_keys)))
        for first in range(0, num_queries, rows):
            yield q_rows[first : first + rows], k_rows, first, num_queries

    for (num_queries, num_keys), seqs in buckets.items():
        per_call = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads_q * num_queries * num_keys))
        for first in range(0, len(seqs), per_call):
            chosen = seqs[first : first + per_call]
            q_rows = torch.tensor([q_bounds[b] for b in chosen], device=device)[:, None]
            q_rows = q_rows + torch.arange(num_queries, device=device)
            k_rows = torch.tensor([k_bounds[b] for b in chosen], device=device)[:, None]
            k_rows = k_rows + torch.arange(num_keys, device=device)
            yield q_rows, k_rows, 0, num_queries


class _Layout:
    """Gathers of packed rows into the pieces' head-grouped layout, and back."""

    def __init__(self, num_heads_q: int, num_heads_kv: int, compute_dtype: torch.dtype):
        self.hq, self.hkv, self.dtype = num_heads_q, num_heads_kv, compute_dtype
        self.group = num_heads_q // num_heads_kv

    def queries(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [..., L] -> [..., Hkv, G, L, D]
        picked = x[rows].to(self.dtype).reshape(*rows.shape, self.hkv, self.group, x.shape[-1])
        return picked.movedim(-4, -2)

    def keys(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [..., L] -> [..., Hkv, L, D]
        return x[rows].to(self.dtype).movedim(-3, -2)

    def lse(self, lse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [..., L] -> [..., Hkv, G, L]
        return lse[rows].to(self.dtype).reshape(*rows.shape, self.hkv, self.group).movedim(-3, -1)

    def packed_queries(self, x_blk: torch.Tensor) -> torch.Tensor:  # [..., Hkv, G, L, D] -> [rows, Hq, D]
        return x_blk.movedim(-2, -4).reshape(-1, self.hq, x_blk.shape[-1])

    def packed_keys(self, x_blk: torch.Tensor) -> torch.Tensor:  # [..., Hkv, L, D] -> [rows, Hkv, D]
        return x_blk.movedim(-2, -3).reshape(-1, self.hkv, x_blk.shape[-1])


def _setup(q: torch.Tensor, k: torch.Tensor, cu_seqlens, cu_seqlens_k, scale):
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    # The reference runs on the host's schedule anyway, so reading the offsets here is fine.
    q_bounds = cu_seqlens.tolist()
    k_bounds = q_bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    return _Layout(q.shape[1], k.shape[1], compute_dtype), scale, q_bounds, k_bounds


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
    by plain autograd; ``varlen_attention_reference_backward`` gives the same gradients from the lse.
    """
    del max_seqlen, max_seqlen_k
    out, lse = varlen_attention_reference_forward(
        q, k, v, cu_seqlens, causal=causal, scale=scale, cu_seqlens_k=cu_seqlens_k, _query_chunk=_query_chunk
    )
    if return_lse:
        return out, lse.to(torch.float32)
    return out


def varlen_attention_reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    _query_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``varlen_attention_reference``'s out and lse, the lse kept in the compute precision (float64 for
    float64 inputs, else float32): what ``varlen_attention_reference_backward`` needs."""
    layout, scale, q_bounds, k_bounds = _setup(q, k, cu_seqlens, cu_seqlens_k, scale)
    query_chunk = QUERY_CHUNK if _query_chunk is None else _query_chunk
    # Results are collected per piece with the query rows they belong to, then put back in row order.
    row_pieces: list[torch.Tensor] = []
    out_pieces: list[torch.Tensor] = []
    lse_pieces: list[torch.Tensor] = []
    for q_rows, k_rows, first, num_queries in _pieces(q_bounds, k_bounds, q.shape[1], query_chunk, q.device):
        out_blk, lse_blk = _attend_block(
            layout.queries(q, q_rows), layout.keys(k, k_rows), layout.keys(v, k_rows), first, num_queries,
            causal, scale,
        )  # fmt: skip
        row_pieces.append(q_rows.reshape(-1))
        out_pieces.append(layout.packed_queries(out_blk))
        lse_pieces.append(lse_blk.movedim(-1, -3).reshape(-1, q.shape[1]))

    if not row_pieces:  # no query at all (T == 0); keep the autograd link to q so callers can still backprop
        return q[:0].clone(memory_format=torch.contiguous_format), q.new_zeros(
            (0, q.shape[1]), dtype=layout.dtype
        )
    order = torch.argsort(torch.cat(row_pieces))
    return torch.cat(out_pieces)[order].to(q.dtype), torch.cat(lse_pieces)[order]


def varlen_attention_reference_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``varlen_attention_reference`` for ``grad_out`` [T, Hq, D], from the lse [T, Hq] of
    ``varlen_attention_reference_forward`` (float64 inputs need its float64 lse for float64 accuracy).

    The same pieces as the forward, each recomputing its probabilities from the lse, so no [Bq, Lk] block
    is kept between the two passes. Gradients come back in the inputs' dtypes, accumulated in fp32 (fp64).
    """
    layout, scale, q_bounds, k_bounds = _setup(q, k, cu_seqlens, cu_seqlens_k, scale)
    grad_q = torch.zeros(q.shape, dtype=layout.dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=layout.dtype, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=layout.dtype, device=v.device)
    for q_rows, k_rows, first, num_queries in _pieces(q_bounds, k_bounds, q.shape[1], QUERY_CHUNK, q.device):
        dq, dk, dv = _attend_block_backward(
            layout.queries(q, q_rows), layout.keys(k, k_rows), layout.keys(v, k_rows),
            layout.lse(lse, q_rows), layout.queries(grad_out, q_rows), first, num_queries, causal, scale,
        )  # fmt: skip
        grad_q[q_rows.reshape(-1)] = layout.packed_queries(dq)
        # A long sequence's keys are shared by all its query blocks: accumulate.
        grad_k.index_add_(0, k_rows.reshape(-1), layout.packed_keys(dk))
        grad_v.index_add_(0, k_rows.reshape(-1), layout.packed_keys(dv))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
