"""varlen_attention's ``"cpu"`` backend (torch's fused CPU flash kernel over groups of equal-length sequences)
against the fp64 oracle and the reference: forward, lse and backward, GQA, separate key packings with rows
that see no key, empty sequences, model-layout strides, determinism. opcheck and compile: test_custom_ops.py.
"""

from __future__ import annotations

import pytest
import torch
from varlen_helpers import cu_from_lengths, dense_attention, random_lengths, random_tensor

from patchrec_kernels.varlen_attention import varlen_attention

# (query lengths, key lengths or None: packed like the queries). Repeated lengths make groups of several
# sequences; the separate packing has Lq < Lk, Lq == Lk, Lq > Lk (blind rows), an empty query sequence and
# an empty key sequence.
SELF = ([1, 7, 3, 7, 12, 1, 5], None)
SEPARATE = ([3, 1, 8, 5, 0, 4, 7, 3], [10, 6, 8, 2, 3, 0, 7, 10])


def _inputs(lengths, hq, hkv, d, dtype, seed):
    len_q, len_k = lengths
    keys = len_q if len_k is None else len_k
    gen = torch.Generator().manual_seed(seed)
    q = random_tensor(gen, sum(len_q), hq, d, dtype=dtype, requires_grad=True)
    k, v = (random_tensor(gen, sum(keys), hkv, d, dtype=dtype, requires_grad=True) for _ in "kv")
    grad_out = random_tensor(gen, sum(len_q), hq, d, dtype=dtype)
    cu_q, cu_k = cu_from_lengths(len_q), cu_from_lengths(keys)
    extra = {} if len_k is None else {"cu_seqlens_k": cu_k, "max_seqlen_k": max(keys)}
    return q, k, v, grad_out, cu_q, cu_k, max(len_q), extra


def _run(backend, q, k, v, grad_out, cu_q, max_q, extra, causal, scale):
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = varlen_attention(*inputs, cu_q, max_q, causal=causal, scale=scale, return_lse=True,
                                backend=backend, **extra)  # fmt: skip
    out.backward(grad_out)
    return out, lse, *(t.grad for t in inputs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [SELF, SEPARATE], ids=["self", "separate-keys"])
@pytest.mark.parametrize("hq, hkv, d", [(6, 2, 12), (3, 3, 123), (4, 1, 8)], ids=["gqa", "mha-d123", "mqa"])
def test_cpu_matches_reference_fp32(causal, lengths, hq, hkv, d):
    """fp32: out, lse and every gradient within 1e-5 of the reference (itself checked against fp64)."""
    q, k, v, grad_out, cu_q, _, max_q, extra = _inputs(lengths, hq, hkv, d, torch.float32, seed=hq * d)
    got = _run("cpu", q, k, v, grad_out, cu_q, max_q, extra, causal, 0.3)
    want = _run("reference", q, k, v, grad_out, cu_q, max_q, extra, causal, 0.3)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert got[2].abs().sum() > 0 and got[3].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_low_precision_within_twice_eager_error(dtype, causal):
    """bf16 / fp16: the error against the fp64 oracle is at most twice eager PyTorch's in the same dtype,
    forward (out) and backward (dq, dk, dv)."""
    gen = torch.Generator().manual_seed(11)
    lengths = random_lengths(gen, 7, 40)
    cu, total = cu_from_lengths(lengths), sum(lengths)
    q = random_tensor(gen, total, 8, 40, dtype=dtype, requires_grad=True)
    k, v = (random_tensor(gen, total, 2, 40, dtype=dtype, requires_grad=True) for _ in "kv")
    grad_out = random_tensor(gen, total, 8, 40, dtype=dtype)

    def errors(compute):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = compute(*inputs)
        out.backward(grad_out.to(out.dtype))
        return [x.double() for x in (out, *(t.grad for t in inputs))]

    oracle = errors(lambda *t: dense_attention(*(x.double() for x in t), cu, cu, causal=causal)[0])
    eager = errors(lambda *t: dense_attention(*t, cu, cu, causal=causal, dtype=dtype)[0])
    got = errors(lambda *t: varlen_attention(*t, cu, max(lengths), causal=causal, backend="cpu"))
    for name, g, e, o in zip(("out", "dq", "dk", "dv"), got, eager, oracle, strict=True):
        eager_err = (e - o).abs().max().item()
        err = (g - o).abs().max().item()
        assert eager_err > 0
        assert err <= 2 * eager_err, (name, err, eager_err)


def test_rows_without_keys_and_empty_sequences():
    """Rows that see no key (Lq > Lk under bottom-right causal; an empty key sequence) give exactly 0 and
    lse -inf, pass no gradient, and leave the other rows as the reference computes them."""
    q, k, v, grad_out, cu_q, cu_k, max_q, extra = _inputs(SEPARATE, 4, 2, 16, torch.float32, seed=3)
    out, lse, dq, dk, dv = _run("cpu", q, k, v, grad_out, cu_q, max_q, extra, True, None)
    len_q, len_k = SEPARATE
    blind = []
    for start, lq, lk in zip(cu_q.tolist(), len_q, len_k, strict=False):
        blind += range(start, start + (lq if lk == 0 else max(0, lq - lk)))
    assert len(blind) == 3 + 4  # Lq 5 > Lk 2: three rows; the 4 queries of the empty key sequence
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    seen = [i for i in range(len(q)) if i not in blind]
    assert torch.isneginf(lse[blind]).all() and torch.isfinite(lse[seen]).all()
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
    want = _run("reference", q, k, v, grad_out, cu_q, max_q, extra, True, None)
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)


def test_model_layout_strides_and_no_queries():
    """q / k / v as transformers hands them over ([1, H, T, D] transposed: unit stride in D, not contiguous)
    give the dense result; a batch with no query row returns empty tensors."""
    gen = torch.Generator().manual_seed(5)
    cu = cu_from_lengths([3, 1, 6])
    q, k, v = (random_tensor(gen, 1, heads, 10, 32)[0].transpose(0, 1) for heads in (8, 2, 2))
    assert not q.is_contiguous()
    out = varlen_attention(q, k, v, cu, 6, backend="cpu")
    dense = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, 6, backend="cpu")
    assert torch.equal(out, dense)
    want = varlen_attention(q, k, v, cu, 6, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    empty = varlen_attention(q[:0], k[:0], v[:0], cu_from_lengths([0, 0]), 0, backend="cpu")
    assert empty.shape == (0, 8, 32)


def test_backward_is_deterministic():
    """Two backward passes (every thread the machine has) give bitwise-equal gradients: each key row belongs
    to one sequence, so nothing is accumulated across groups."""
    q, k, v, grad_out, cu_q, _, max_q, extra = _inputs(SELF, 6, 2, 32, torch.float32, seed=9)
    first = _run("cpu", q, k, v, grad_out, cu_q, max_q, extra, True, None)
    second = _run("cpu", q, k, v, grad_out, cu_q, max_q, extra, True, None)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
