"""``patchrec::varlen_attention``: the reference backend of ``varlen_attention`` as ``torch.library`` ops.

torch.compile (and FakeTensor / meta tracing, FlopCounterMode) sees one op with a shape function instead of
tracing the reference's per-sequence Python loop, which reads the offsets. The backward is an op of its own
that recomputes each block's probabilities from the forward's lse (no [Lq, Lk] block is kept in between).
``max_seqlen`` / ``max_seqlen_k`` are SymInts, so with dynamic shapes a new packed batch reuses a compiled
graph. Both ops carry a FLOP formula for ``torch.utils.flop_counter.FlopCounterMode``.

The fused backends need no wrapping: flash-attn's and torch's varlen kernels are ``torch.library`` ops of
their own, with shape functions and autograd, and ``varlen_attention`` calls them through plain glue that
compile traces. No checks here: ``varlen_attention`` checks its inputs before calling the op.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from patchrec_kernels.reference.varlen_attention import (
    varlen_attention_reference_backward,
    varlen_attention_reference_forward,
)


@torch.library.custom_op("patchrec::varlen_attention", mutates_args=())
def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``patchrec::varlen_attention``: out [T, Hq, D] and lse [T, Hq] from the reference, the lse in the
    compute precision (float64 for float64 inputs, else float32) for the backward. No checks:
    ``varlen_attention`` checks first. The lse is not differentiable (its gradient is ignored)."""
    del max_seqlen, max_seqlen_k  # bounds for the fused kernels; part of the schema for parity with them
    return varlen_attention_reference_forward(
        q, k, v, cu_seqlens, causal=causal, scale=scale, cu_seqlens_k=cu_seqlens_k
    )


@varlen_attention_op.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=lse_dtype)


@torch.library.custom_op("patchrec::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``patchrec::varlen_attention_backward``: dq, dk, dv of the op from its lse."""
    return varlen_attention_reference_backward(
        grad_out, q, k, v, lse, cu_seqlens, causal=causal, scale=scale, cu_seqlens_k=cu_seqlens_k
    )


@varlen_attention_backward_op.register_fake
def _varlen_attention_backward_fake(grad_out, q, k, v, lse, cu_seqlens, cu_seqlens_k, max_seqlen,
                                    max_seqlen_k, causal, scale):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[1], cu_seqlens, cu_seqlens_k)
    ctx.args = (max_seqlen, max_seqlen_k, causal, scale)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    grads = varlen_attention_backward_op(grad_out, q, k, v, lse, cu_seqlens, cu_seqlens_k, *ctx.args)
    grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3], strict=True)]
    return (*grads, None, None, None, None, None, None)


varlen_attention_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def attention_pairs(
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen: int,
    max_seqlen_k: int,
    total_q: int,
    causal: bool,
) -> int:
    """(query, key) pairs that ``varlen_attention`` scores: each query times the keys it may see.

    Exact when the offsets hold values (read once, a sync on a GPU). Meta / fake offsets have none, so the
    count is an upper bound from the shapes: T * (max_seqlen + 1) / 2 for causal self-attention (a sequence
    of L <= max_seqlen rows has L (L + 1) / 2 pairs), T * max_seqlen_k otherwise.
    """
    if type(cu_seqlens) is not torch.Tensor or cu_seqlens.is_meta:  # FakeTensor / FunctionalTensor / meta
        if causal and cu_seqlens_k is None:
            return total_q * (max_seqlen + 1) // 2
        return total_q * max_seqlen_k
    len_q = cu_seqlens.diff().tolist()
    len_k = len_q if cu_seqlens_k is None else cu_seqlens_k.diff().tolist()
    pairs = 0
    for lq, lk in zip(len_q, len_k, strict=True):
        if not causal:
            pairs += lq * lk
        elif lq <= lk + 1:  # bottom-right: query i sees i + lk - lq + 1 keys
            pairs += lq * lk - lq * (lq - 1) // 2
        else:  # the first lq - lk queries see no key; the last lk see 1..lk keys
            pairs += lk * (lk + 1) // 2
    return pairs


def attention_matmul_flops(matmuls, q, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal) -> int:
    # 2 FLOPs per multiply-add, per head and visible (query, key) pair, for each [q, k]-shaped matmul.
    pairs = attention_pairs(cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, q.shape[0], causal)
    return matmuls * 2 * q.shape[1] * q.shape[2] * pairs


@register_flop_formula(torch.ops.patchrec.varlen_attention, get_raw=True)
def _varlen_attention_flop(q, k, v, cu_q, cu_k, max_q, max_k, causal, *args, out_val=None, **kwargs) -> int:
    return attention_matmul_flops(2, q, cu_q, cu_k, max_q, max_k, causal)  # q k^T and p v


@register_flop_formula(torch.ops.patchrec.varlen_attention_backward, get_raw=True)
def _varlen_attention_backward_flop(grad_out, q, k, v, lse, cu_q, cu_k, max_q, max_k, causal, *args,
                                    out_val=None, **kwargs) -> int:  # fmt: skip
    # The recomputed q k^T, dP = dO v^T, dV = P^T dO, dQ = dS k, dK = dS^T q.
    return attention_matmul_flops(5, q, cu_q, cu_k, max_q, max_k, causal)
