"""``patchrec::varlen_attention_cpu``: the ``"cpu"`` backend of ``varlen_attention``, torch's fused CPU
flash-attention kernel run over packed sequences.

The reference computes every block's full [Lq, Lk] score matrix in several eager passes and cannot skip the
masked half of a causal block; on long prompts that made attention most of a CPU step (one 2,000-row
sequence of SmolLM2's shapes: 0.59 s for the reference, 0.08 s for this kernel, one thread). torch's
``aten._scaled_dot_product_flash_attention_for_cpu`` is a fused, blocked kernel with a log-sum-exp output
and a backward of its own, but it takes a dense [B, H, L, D] batch. So the sequences are grouped by their
(query, key) lengths, each group gathered into one dense call, and the results scattered back; nothing is
padded. Bottom-right causal alignment (the contract of every backend) is the kernel's own causal mask when
Lq == Lk, an additive mask when Lq < Lk, and, when Lq > Lk, the kernel's causal mask on the last Lk queries
while the first Lq - Lk see no key (output 0, lse -inf). GQA is an expand of the key heads (query head h
reads kv head h // G) whose gradient is summed back over the group.

Both directions are ``torch.library`` custom ops with fake implementations and FLOP formulas, like the
reference's (``varlen_ops``): torch.compile sees one op instead of the grouping loop, which reads the
offsets. No checks here: ``varlen_attention`` checks its inputs first.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from patchrec_kernels.varlen_ops import attention_matmul_flops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_forward_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _groups(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None, causal: bool):
    """(query rows [n, Lq'], key rows [n, Lk], is_causal, additive mask or None) per group of sequences with
    equal lengths; Lq' drops the leading queries that see no key (causal, Lq > Lk; or Lk == 0)."""
    q_bounds = cu_seqlens.tolist()
    k_bounds = q_bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    by_lengths: dict[tuple[int, int], list[int]] = {}
    for b in range(len(q_bounds) - 1):
        key = (q_bounds[b + 1] - q_bounds[b], k_bounds[b + 1] - k_bounds[b])
        by_lengths.setdefault(key, []).append(b)
    device = cu_seqlens.device
    for (len_q, len_k), seqs in by_lengths.items():
        blind = len_q if len_k == 0 else (max(0, len_q - len_k) if causal else 0)
        if len_q - blind == 0:
            continue  # no query of these sequences sees a key: their zeros / -inf are already in place
        q_rows = torch.tensor([q_bounds[b] + blind for b in seqs], device=device)[:, None]
        q_rows = q_rows + torch.arange(len_q - blind, device=device)
        k_rows = torch.tensor([k_bounds[b] for b in seqs], device=device)[:, None]
        k_rows = k_rows + torch.arange(len_k, device=device)
        mask = None
        if causal and len_q < len_k:  # bottom-right: query i sees keys j <= i + Lk - Lq
            visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(len_k - len_q)
            mask = torch.zeros(len_q, len_k, device=device).masked_fill(~visible, float("-inf"))
        yield q_rows, k_rows, causal and len_q - blind == len_k and mask is None, mask


def _heads_first(x: torch.Tensor, rows: torch.Tensor, group: int) -> torch.Tensor:
    """Packed x [T, H, D] at rows [n, L] as the kernel's [n, H * group, L, D] (each head repeated ``group``
    times in a row: query head h reads kv head h // group)."""
    picked = x[rows]  # [n, L, H, D]
    if group > 1:
        n, length, heads, dim = picked.shape
        picked = picked[:, :, :, None].expand(n, length, heads, group, dim).reshape(n, length, -1, dim)
    return picked.transpose(1, 2)


@torch.library.custom_op("patchrec::varlen_attention_cpu", mutates_args=())
def varlen_attention_cpu_op(
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
    """out [T, Hq, D] in q's dtype and lse [T, Hq] float32 (-inf on rows that see no key)."""
    del max_seqlen, max_seqlen_k  # bounds for the GPU kernels; part of the schema for parity with them
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for q_rows, k_rows, is_causal, mask in _groups(cu_seqlens, cu_seqlens_k, causal):
        mask = None if mask is None else mask.to(q.dtype)
        out_g, lse_g = _forward_kernel(
            _heads_first(q, q_rows, 1), _heads_first(k, k_rows, group), _heads_first(v, k_rows, group),
            0.0, is_causal, attn_mask=mask, scale=scale,
        )  # fmt: skip
        out[q_rows.reshape(-1)] = out_g.transpose(1, 2).reshape(-1, *q.shape[1:])
        lse[q_rows.reshape(-1)] = lse_g.transpose(1, 2).reshape(-1, q.shape[1]).float()
    return out, lse


@varlen_attention_cpu_op.register_fake
def _varlen_attention_cpu_fake(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("patchrec::varlen_attention_cpu_backward", mutates_args=())
def varlen_attention_cpu_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of the op, from its out and lse (the kernel's own backward, group by group)."""
    del max_seqlen, max_seqlen_k
    group = q.shape[1] // k.shape[1]
    grad_q, grad_k, grad_v = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    for q_rows, k_rows, is_causal, mask in _groups(cu_seqlens, cu_seqlens_k, causal):
        mask = None if mask is None else mask.to(q.dtype)
        # The kernel reads lse in its own layout [n, Hq, Lq] and dtype (float32).
        lse_g = lse[q_rows].transpose(1, 2).contiguous()
        dq, dk, dv = _backward_kernel(
            _heads_first(grad_out, q_rows, 1).contiguous(), _heads_first(q, q_rows, 1),
            _heads_first(k, k_rows, group), _heads_first(v, k_rows, group),
            _heads_first(out, q_rows, 1).contiguous(), lse_g, 0.0, is_causal, attn_mask=mask, scale=scale,
        )  # fmt: skip
        grad_q[q_rows.reshape(-1)] = dq.transpose(1, 2).reshape(-1, *q.shape[1:])
        for grad, d in ((grad_k, dk), (grad_v, dv)):
            # [n, Hq, Lk, D] -> [n, Lk, Hkv, D]: the expanded heads' gradients summed back over the group.
            d = d.unflatten(1, (k.shape[1], group)).sum(2).transpose(1, 2)
            grad[k_rows.reshape(-1)] = d.reshape(-1, *k.shape[1:])
    return grad_q, grad_k, grad_v


@varlen_attention_cpu_backward_op.register_fake
def _varlen_attention_cpu_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen,
                                        max_seqlen_k, causal, scale):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, cu_seqlens_k)
    ctx.args = (max_seqlen, max_seqlen_k, causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    grads = varlen_attention_cpu_backward_op(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens_k, *ctx.args
    )
    grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3], strict=True)]
    return (*grads, None, None, None, None, None, None)


varlen_attention_cpu_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.patchrec.varlen_attention_cpu, get_raw=True)
def _varlen_attention_cpu_flop(q, k, v, cu_q, cu_k, max_q, max_k, causal, *args, out_val=None, **kwargs):
    return attention_matmul_flops(2, q, cu_q, cu_k, max_q, max_k, causal)  # q k^T and p v


@register_flop_formula(torch.ops.patchrec.varlen_attention_cpu_backward, get_raw=True)
def _varlen_attention_cpu_backward_flop(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, *args,
                                        out_val=None, **kwargs):  # fmt: skip
    return attention_matmul_flops(5, q, cu_q, cu_k, max_q, max_k, causal)  # as the reference's backward
