"""Parity tests for varlen_attention's reference: vs per-sequence SDPA and an fp64 oracle, lse and merging,
isolation between sequences, gradients, blocking, input checks. The backends (resolution, the fused
backends' glue through fakes, the real kernels on a GPU) are in test_varlen_attention_backends.py."""

from __future__ import annotations

import pytest
import torch
from varlen_helpers import cu_from_lengths, dense_attention, random_lengths, random_tensor, sdpa_per_sequence

from patchrec_kernels.reference import varlen_attention as refmod
from patchrec_kernels.reference.varlen_attention import varlen_attention_reference
from patchrec_kernels.varlen_attention import varlen_attention

# ---------------------------------------------------------------------------------- reference vs SDPA

SDPA_CASES = [
    # (lengths, Hq, Hkv, D)
    ([1, 7, 1, 33, 16], 8, 2, 24),
    ([29], 4, 4, 40),  # a batch of one
    ([3, 1, 12, 5, 1, 9], 8, 8, 40),
    ([17, 2, 1, 31], 6, 3, 123),
    (None, 8, 2, 16),  # random ragged lengths
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: f"L{c[0]}_H{c[1]}x{c[2]}_D{c[3]}")
def test_reference_matches_sdpa(case, causal):
    lengths, hq, hkv, d = case
    gen = torch.Generator().manual_seed(hash((hq, hkv, d, causal)) % 2**31)
    if lengths is None:
        lengths = random_lengths(gen, 9, 40)
    cu = cu_from_lengths(lengths)
    total = sum(lengths)
    q, k, v = (
        random_tensor(gen, total, hq, d),
        random_tensor(gen, total, hkv, d),
        random_tensor(gen, total, hkv, d),
    )
    expected = sdpa_per_sequence(q, k, v, cu, causal=causal)
    out = varlen_attention_reference(q, k, v, cu, max(lengths), causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The public op on CPU resolves to the reference: same numbers, int64 offsets accepted.
    public = varlen_attention(q, k, v, cu.long(), max(lengths), causal=causal)
    torch.testing.assert_close(public, expected, rtol=1e-5, atol=1e-5)


def test_reference_custom_scale():
    gen = torch.Generator().manual_seed(1)
    lengths = [4, 11, 1]
    cu, total = cu_from_lengths(lengths), sum(lengths)
    q, k, v = (random_tensor(gen, total, 4, 32) for _ in range(3))
    expected = sdpa_per_sequence(q, k, v, cu, causal=True, scale=0.37)
    out = varlen_attention(q, k, v, cu, 11, scale=0.37)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- reference vs fp64


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_vs_fp64(dtype, causal):
    gen = torch.Generator().manual_seed(7)
    lengths = random_lengths(gen, 6, 48)
    cu, total = cu_from_lengths(lengths), sum(lengths)
    q, k, v = (
        random_tensor(gen, total, 8, 40, dtype=dtype),
        *(random_tensor(gen, total, 2, 40, dtype=dtype) for _ in range(2)),
    )
    oracle, oracle_lse = dense_attention(q, k, v, cu, cu, causal=causal)
    out, lse = varlen_attention_reference(q, k, v, cu, max(lengths), causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (total, 8)
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-5)
    else:
        eager, _ = dense_attention(q, k, v, cu, cu, causal=causal, dtype=dtype)
        ref_err = (out.double() - oracle).abs().max().item()
        eager_err = (eager.double() - oracle).abs().max().item()
        assert eager_err > 0
        assert ref_err <= 2 * eager_err, (ref_err, eager_err)


# ------------------------------------------------------------------------------------------ lse, merge


def test_public_lse_matches_fp64_and_is_detached():
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 20, 9]
    cu, total = cu_from_lengths(lengths), sum(lengths)
    q = random_tensor(gen, total, 4, 24, requires_grad=True)
    k, v = (random_tensor(gen, total, 4, 24, requires_grad=True) for _ in range(2))
    out, lse = varlen_attention(q, k, v, cu, 20, return_lse=True)
    _, oracle_lse = dense_attention(q, k, v, cu, cu, causal=True)
    assert lse.shape == (total, 4) and lse.dtype == torch.float32 and not lse.requires_grad
    assert out.requires_grad
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-5, atol=1e-5)


def merge(out1, lse1, out2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * out1 + torch.exp(lse2 - lse)[..., None] * out2, lse


@pytest.mark.parametrize("hkv", [2, 8])
def test_merge_prefix_and_continuation(hkv):
    """Attention over [prompt ++ continuation] == merge(non-causal over the prompt, causal over itself)."""
    gen = torch.Generator().manual_seed(11 + hkv)
    prompt_lens, cont_lens = [6, 0, 13, 1], [4, 7, 1, 9]  # a sample with an empty prompt included
    hq, d = 8, 32
    cu_p, cu_c = cu_from_lengths(prompt_lens), cu_from_lengths(cont_lens)
    q = random_tensor(gen, sum(cont_lens), hq, d)
    kp, vp = (random_tensor(gen, sum(prompt_lens), hkv, d) for _ in range(2))
    kc, vc = (random_tensor(gen, sum(cont_lens), hkv, d) for _ in range(2))

    # Full key set per sample: its prompt then its continuation.
    k_full = torch.cat([t for b in range(4) for t in (kp[cu_p[b] : cu_p[b + 1]], kc[cu_c[b] : cu_c[b + 1]])])
    v_full = torch.cat([t for b in range(4) for t in (vp[cu_p[b] : cu_p[b + 1]], vc[cu_c[b] : cu_c[b + 1]])])
    cu_full = cu_from_lengths([p + c for p, c in zip(prompt_lens, cont_lens, strict=True)])
    full, full_lse = varlen_attention(
        q, k_full, v_full, cu_c, 9, cu_seqlens_k=cu_full, max_seqlen_k=22, return_lse=True
    )

    prefix, prefix_lse = varlen_attention(
        q, kp, vp, cu_c, 9, causal=False, cu_seqlens_k=cu_p, max_seqlen_k=13, return_lse=True
    )
    own, own_lse = varlen_attention(q, kc, vc, cu_c, 9, causal=True, return_lse=True)
    # The empty prompt: no visible key -> output 0 and lse -inf, which the merge then ignores.
    empty = slice(int(cu_c[1]), int(cu_c[2]))
    assert torch.equal(prefix[empty], torch.zeros_like(prefix[empty]))
    assert torch.isneginf(prefix_lse[empty]).all()

    merged, merged_lse = merge(prefix, prefix_lse, own, own_lse)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, full_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_separate_key_packing_vs_dense(causal):
    """Bottom-right causal with cu_seqlens_k, including Lq > Lk (rows with no key) and Lk == 0."""
    gen = torch.Generator().manual_seed(5)
    len_q, len_k = [3, 1, 8, 5, 2, 4], [10, 6, 8, 2, 0, 1]
    cu_q, cu_k = cu_from_lengths(len_q), cu_from_lengths(len_k)
    q = random_tensor(gen, sum(len_q), 6, 24)
    k, v = (random_tensor(gen, sum(len_k), 3, 24) for _ in range(2))
    out, lse = varlen_attention(q, k, v, cu_q, 8, causal=causal, cu_seqlens_k=cu_k, return_lse=True)
    oracle, oracle_lse = dense_attention(q, k, v, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-5, atol=1e-5)
    empty_rows = torch.isneginf(oracle_lse[:, 0])
    # causal: seq 3 (Lq 5, Lk 2) and seq 5 (Lq 4, Lk 1) have 3 blind rows each; seq 4 (Lk 0) has 2 always
    assert int(empty_rows.sum()) == (8 if causal else 2)
    assert torch.equal(out[empty_rows], torch.zeros_like(out[empty_rows]))
    assert torch.isneginf(lse[empty_rows]).all()


# ------------------------------------------------------------------------------------ isolation, grads


@pytest.mark.parametrize("hkv", [2, 8])
def test_no_cross_sequence_leakage(hkv):
    gen = torch.Generator().manual_seed(21)
    lengths = [7, 1, 15, 4]
    cu, total = cu_from_lengths(lengths), sum(lengths)
    q = random_tensor(gen, total, 8, 16)
    k, v = (random_tensor(gen, total, hkv, 16) for _ in range(2))
    base = varlen_attention(q, k, v, cu, 15)
    for victim in range(len(lengths)):
        rows = slice(int(cu[victim]), int(cu[victim + 1]))
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[rows] += random_tensor(gen, *t[rows].shape)
        out = varlen_attention(q2, k2, v2, cu, 15)
        others = torch.ones(total, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(out[others], base[others])
        assert not torch.equal(out[rows], base[rows])


@pytest.mark.parametrize("causal", [True, False])
def test_backward_matches_sdpa(causal):
    gen = torch.Generator().manual_seed(31)
    lengths = [1, 9, 22, 3]
    cu, total = cu_from_lengths(lengths), sum(lengths)
    leaves = [
        random_tensor(gen, total, 8, 24),
        random_tensor(gen, total, 2, 24),
        random_tensor(gen, total, 2, 24),
    ]
    grad_out = random_tensor(gen, total, 8, 24)

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in leaves]
        fn(*inputs).backward(grad_out)
        return [t.grad for t in inputs]

    expected = grads(lambda q, k, v: sdpa_per_sequence(q, k, v, cu, causal=causal))
    actual = grads(lambda q, k, v: varlen_attention(q, k, v, cu, 22, causal=causal))
    for name, a, e in zip("qkv", actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_query_blocking_matches_unblocked(monkeypatch):
    gen = torch.Generator().manual_seed(41)
    lengths = [2500, 3, 700]
    cu, total = cu_from_lengths(lengths), sum(lengths)
    q, k, v = (
        random_tensor(gen, total, 2, 8),
        random_tensor(gen, total, 1, 8),
        random_tensor(gen, total, 1, 8),
    )
    whole, whole_lse = varlen_attention_reference(q, k, v, cu, 2500, return_lse=True, _query_chunk=10**9)
    blocked, blocked_lse = varlen_attention_reference(q, k, v, cu, 2500, return_lse=True, _query_chunk=97)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocked_lse, whole_lse, rtol=1e-6, atol=1e-6)
    # The score-size cap shrinks blocks too (here to 50 queries for the 2500-key sequence).
    monkeypatch.setattr(refmod, "_MAX_SCORE_ELEMENTS", 2 * 2500 * 50)
    capped = varlen_attention_reference(q, k, v, cu, 2500)
    torch.testing.assert_close(capped, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, sdpa_per_sequence(q, k, v, cu, causal=True), rtol=1e-5, atol=1e-5)


def test_validate_false_skips_value_checks():
    gen = torch.Generator().manual_seed(2)
    cu = cu_from_lengths([4, 6])
    q, k, v = (random_tensor(gen, 10, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, 3)
    # max_seqlen is only a kernel hint; without validation it is not read against the offsets
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, 3, validate=False), varlen_attention(q, k, v, cu, 6)
    )


def test_empty_batch():
    q = torch.zeros(0, 4, 8, requires_grad=True)
    out, lse = varlen_attention(
        q, torch.zeros(0, 2, 8), torch.zeros(0, 2, 8), cu_from_lengths([]), 0, return_lse=True
    )
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


# ------------------------------------------------------------------------------------------ bad inputs


def _good():
    cu = cu_from_lengths([3, 5])
    return dict(
        q=torch.randn(8, 4, 16), k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16), cu_seqlens=cu, max_seqlen=5
    )


BAD_INPUTS = [
    ("q", lambda a: a.update(q=torch.randn(8, 64))),
    ("k", lambda a: a.update(k=torch.randn(8, 2, 8), v=torch.randn(8, 2, 8))),  # head_dim differs from q
    ("v", lambda a: a.update(v=torch.randn(8, 1, 16))),
    ("k", lambda a: a.update(k=torch.randn(8, 3, 16), v=torch.randn(8, 3, 16))),  # 4 % 3 != 0
    ("k", lambda a: a.update(k=torch.randn(7, 2, 16), v=torch.randn(7, 2, 16))),  # Tk != T, no cu_seqlens_k
    ("k", lambda a: a.update(k=a["k"].double())),
    ("q", lambda a: a.update(q=a["q"].long())),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=a["cu_seqlens"].float())),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=a["cu_seqlens"][None])),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32))),  # not from 0
    (
        "cu_seqlens",
        lambda a: a.update(cu_seqlens=torch.tensor([0, 6, 3, 8], dtype=torch.int32)),
    ),  # decreasing
    ("cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))),  # ends != T
    ("max_seqlen", lambda a: a.update(max_seqlen=4)),
    ("max_seqlen", lambda a: a.update(max_seqlen=5.0)),
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32))),  # batch size
    (
        "cu_seqlens_k",
        lambda a: a.update(cu_seqlens_k=torch.tensor([0, 5, 6], dtype=torch.int32)),
    ),  # ends != Tk
    ("max_seqlen_k", lambda a: a.update(cu_seqlens_k=a["cu_seqlens"], max_seqlen_k=4)),
    ("max_seqlen_k", lambda a: a.update(max_seqlen_k=7)),  # differs from max_seqlen without cu_seqlens_k
    ("backend", lambda a: a.update(backend="triton")),
]


@pytest.mark.parametrize("arg, mutate", BAD_INPUTS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise(arg, mutate):
    torch.manual_seed(0)
    kwargs = _good()
    varlen_attention(**kwargs)  # the unmutated call is fine
    mutate(kwargs)
    with pytest.raises(ValueError, match=arg):
        varlen_attention(**kwargs)
