"""Packed-sequence helpers and oracles shared by the varlen_attention tests."""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

# The package re-exports the op under the module's name, so fetch the module itself.
vmod = importlib.import_module("patchrec_kernels.varlen_attention")




def cu_from_lengths(lengths, device="cpu", dtype=torch.int32) -> torch.Tensor:
    return F.pad(torch.tensor(lengths, dtype=torch.int64).cumsum(0), (1, 0)).to(device=device, dtype=dtype)


def random_lengths(gen: torch.Generator, batch: int, max_len: int) -> list[int]:
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lengths[0] = 1  # always include a length-1 sequence
    return lengths


def random_tensor(gen, *shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def sdpa_per_sequence(q, k, v, cu, *, causal, scale=None) -> torch.Tensor:
    """Attention by slicing each sequence and calling SDPA on it (independent of the packing logic)."""
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def dense_attention(q, k, v, cu_q, cu_k, *, causal, scale=None, dtype=torch.float64):
    """Dense masked attention over the whole packed batch, computed in ``dtype``.

    In float64 it is the oracle; in bf16/fp16 it is the "eager PyTorch" baseline of the tolerance rule.
    Differentiable, on q's device (offsets on the same device).
    Returns out [T, Hq, D] (dtype) and lse [T, Hq] (dtype). Rows with no visible key give 0 and -inf.
    """
    total_q, num_heads, head_dim = q.shape
    total_k = k.shape[0]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dev = q.device
    len_q, len_k = cu_q.diff().long(), cu_k.diff().long()
    seq_q = torch.repeat_interleave(torch.arange(len_q.numel(), device=dev), len_q)
    seq_k = torch.repeat_interleave(torch.arange(len_k.numel(), device=dev), len_k)
    pos_q = torch.arange(total_q, device=dev) - cu_q.long()[seq_q]
    pos_k = torch.arange(total_k, device=dev) - cu_k.long()[seq_k]
    allowed = seq_q[:, None] == seq_k[None, :]
    if causal:
        offset = (len_k - len_q)[seq_q]
        allowed &= pos_k[None, :] <= (pos_q + offset)[:, None]
    group = num_heads // k.shape[1]
    qd = q.to(dtype)
    kd = k.to(dtype).repeat_interleave(group, dim=1)
    vd = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", qd, kd) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.float() if dtype != torch.float64 else scores, dim=-1).to(dtype)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("hts,shd->thd", probs, vd)
    return out, lse.transpose(0, 1)


