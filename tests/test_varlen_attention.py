"""Parity tests for varlen_attention: reference vs SDPA / an fp64 oracle, lse and merging, backends.

The fused backends need CUDA; on a CPU machine their glue (argument mapping, head-dim padding, GQA,
lse layout) is still exercised through fakes that compute with the reference, and the real kernels are
compared in the ``@pytest.mark.gpu`` tests at the end.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from patchrec_kernels.reference import varlen_attention as refmod
from patchrec_kernels.reference.varlen_attention import varlen_attention_reference
from patchrec_kernels.runtime import HAS_FLASH_ATTN
from patchrec_kernels.varlen_attention import resolve_varlen_backend, varlen_attention

# The package re-exports the op under the module's name, so fetch the module itself.
vmod = importlib.import_module("patchrec_kernels.varlen_attention")

# ----------------------------------------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------------------------- backend resolution

TORCH_2_13_PARAMS = frozenset({"return_aux", "scale", "window_size", "enable_gqa"})
TORCH_OLD_PARAMS = frozenset({"return_aux", "is_causal"})  # 2.10-style: no window, no gqa, no scale


def test_cpu_resolves_to_reference(caplog):
    q = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger=vmod.__name__):
        assert resolve_varlen_backend(q) == "reference"
    assert "backend=reference" in caplog.text
    for name in ("flash_attn", "torch"):
        with pytest.raises(ValueError, match=name):
            resolve_varlen_backend(q, backend=name)
        with pytest.raises(ValueError, match="cannot run here"):
            varlen_attention(q, q, q, cu_from_lengths([4]), 4, backend=name)


def test_installed_torch_varlen_signature():
    """The torch backend's assumptions about the installed torch (2.13): the 2.13-style keywords exist."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13):
        pytest.skip("older torch: the backend adapts to its signature instead")
    params = vmod._torch_varlen_params()
    assert params is not None and TORCH_2_13_PARAMS <= params


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend tensors sit on an sm80+ GPU so that the availability logic can be exercised on CPU."""
    monkeypatch.setattr(vmod, "_cuda_problem", lambda q: None)
    return monkeypatch


@pytest.mark.parametrize(
    "flash, torch_params, dtype, head_dim, return_lse, expected",
    [
        (True, TORCH_2_13_PARAMS, torch.float16, 64, True, "flash_attn"),
        (False, TORCH_2_13_PARAMS, torch.bfloat16, 64, True, "torch"),
        (False, None, torch.bfloat16, 64, False, "reference"),
        (True, TORCH_2_13_PARAMS, torch.float32, 64, False, "reference"),
        (True, TORCH_2_13_PARAMS, torch.float16, 320, False, "reference"),
        (False, frozenset({"is_causal"}), torch.float16, 64, True, "reference"),  # no lse there
        (False, frozenset({"is_causal"}), torch.float16, 64, False, "torch"),
    ],
)
def test_auto_resolution_order(fake_gpu, flash, torch_params, dtype, head_dim, return_lse, expected):
    fake_gpu.setattr(vmod, "HAS_FLASH_ATTN", flash)
    fake_gpu.setattr(vmod, "_torch_varlen_params", lambda: torch_params)
    q = torch.zeros(3, 2, head_dim, dtype=dtype)
    assert resolve_varlen_backend(q, return_lse=return_lse) == expected


def test_explicit_backend_reasons(fake_gpu):
    fake_gpu.setattr(vmod, "HAS_FLASH_ATTN", False)
    fake_gpu.setattr(vmod, "_torch_varlen_params", lambda: frozenset({"is_causal"}))
    q = torch.zeros(3, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not installed"):
        resolve_varlen_backend(q, backend="flash_attn")
    with pytest.raises(ValueError, match="return_aux"):
        resolve_varlen_backend(q, backend="torch", return_lse=True)
    with pytest.raises(ValueError, match="fp16/bf16"):
        resolve_varlen_backend(q.float(), backend="torch")
    assert resolve_varlen_backend(q, backend="reference") == "reference"


# ------------------------------------------------------------- fused-backend glue on CPU, through fakes


def _fake_kernel(q, k, v, cu_q, cu_k, causal, scale, *, padded_lse=False):
    """What a flash kernel returns, computed by the reference: out, and lse in the kernel layout ([Hq, T],
    or the padded [B, Hq, max_q] of old flash-attn) with +inf on rows that see no key. Those rows' output
    is poisoned so that the public op has to zero them itself."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert q.shape[-1] <= 256
    out, lse = varlen_attention_reference(
        q, k, v, cu_q, 0, causal=causal, scale=scale, cu_seqlens_k=cu_k, return_lse=True
    )
    blind = torch.isneginf(lse)
    out = out.masked_fill(blind[..., None], 123.0)
    lse = lse.masked_fill(blind, math.inf)
    if not padded_lse:
        return out, lse.transpose(0, 1).contiguous()
    lengths = cu_q.diff().tolist()
    padded = torch.full((len(lengths), q.shape[1], max(lengths)), float("nan"))
    for b, (start, length) in enumerate(zip(cu_q.tolist(), lengths, strict=False)):
        padded[b, :, :length] = lse[start : start + length].transpose(0, 1)
    return out, padded


def fake_varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                          scale=None, window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    assert isinstance(window_size, tuple) and window_size in ((-1, -1), (-1, 0))
    assert query.shape[-1] % 8 == 0, "torch's flash kernel needs head_dim % 8 == 0"
    assert enable_gqa or query.shape[1] == key.shape[1]
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, window_size == (-1, 0), scale)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def fake_varlen_attn_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                         is_causal=False):  # fmt: skip
    assert query.shape[-1] % 8 == 0 and query.shape[1] == key.shape[1]
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, is_causal, None)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _fake_flash_module(padded_lse):
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False, return_attn_probs=False):  # fmt: skip
        assert dropout_p == 0.0
        out, lse = _fake_kernel(q, k, v, cu_q, cu_k, causal, softmax_scale, padded_lse=padded_lse)
        return (out, lse, None) if return_attn_probs else out

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


FAKE_BACKENDS = {
    "torch-2.13": (
        "torch",
        lambda mp: mp.setattr(torch.nn.attention.varlen, "varlen_attn", fake_varlen_attn_2_13),
    ),
    "torch-old": (
        "torch",
        lambda mp: mp.setattr(torch.nn.attention.varlen, "varlen_attn", fake_varlen_attn_old),
    ),
    "flash": ("flash_attn", lambda mp: mp.setitem(sys.modules, "flash_attn", _fake_flash_module(False))),
    "flash-padded-lse": (
        "flash_attn",
        lambda mp: mp.setitem(sys.modules, "flash_attn", _fake_flash_module(True)),
    ),
}


@pytest.mark.parametrize("fake", list(FAKE_BACKENDS))
@pytest.mark.parametrize("separate_keys", [False, True])
def test_fused_backend_glue_matches_reference(fake_gpu, fake, separate_keys):
    """Argument mapping, GQA, head-dim padding, scale, lse layout and blind rows of the fused paths."""
    import torch.nn.attention.varlen  # noqa: F401  (so the fake can replace its varlen_attn)

    name, install = FAKE_BACKENDS[fake]
    install(fake_gpu)
    fake_gpu.setattr(vmod, "HAS_FLASH_ATTN", True)
    fake_gpu.setattr(vmod, "_FUSED_DTYPES", (torch.float32,))  # fp32 so that the comparison is tight
    params = {"torch-2.13": TORCH_2_13_PARAMS, "torch-old": TORCH_OLD_PARAMS}.get(fake, TORCH_2_13_PARAMS)
    fake_gpu.setattr(vmod, "_torch_varlen_params", lambda: params)

    gen = torch.Generator().manual_seed(51)
    len_q = [3, 1, 8, 5]
    len_k = [10, 6, 8, 2] if separate_keys else len_q
    cu_q, cu_k = cu_from_lengths(len_q, dtype=torch.int64), cu_from_lengths(len_k, dtype=torch.int64)
    q = random_tensor(gen, sum(len_q), 8, 36, requires_grad=True)  # 36: padded to 40 for torch's kernel
    k, v = (random_tensor(gen, sum(len_k), 2, 36, requires_grad=True) for _ in range(2))
    extra = {"cu_seqlens_k": cu_k, "max_seqlen_k": max(len_k)} if separate_keys else {}
    grad_out = random_tensor(gen, sum(len_q), 8, 36)
    scale = 0.3  # the old signature has no scale argument: the backend folds it into q

    results = {}
    for backend in (name, "reference"):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = varlen_attention(*inputs, cu_q, 8, scale=scale, return_lse=True, backend=backend, **extra)
        out.backward(grad_out)
        results[backend] = (out, lse, *(t.grad for t in inputs))
    for what, a, e in zip(("out", "lse", "dq", "dk", "dv"), results[name], results["reference"], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, w=what: f"{w}: {m}")
    if separate_keys:  # seq 3 has Lq 5 > Lk 2: three rows with no key, poisoned by the fake kernel
        assert torch.isneginf(results[name][1]).sum() == 3 * 8


def test_lse_layouts_normalised():
    gen = torch.Generator().manual_seed(61)
    cu = cu_from_lengths([2, 3])
    token_major = random_tensor(gen, 5, 3)
    token_major[1, 2] = math.inf  # a kernel's empty row
    expected = token_major.masked_fill(token_major == math.inf, -math.inf)
    head_major = token_major.transpose(0, 1).contiguous()
    padded = torch.full((2, 3, 3), float("nan"))
    padded[0, :, :2], padded[1, :, :3] = head_major[:, :2], head_major[:, 2:]
    for lse in (token_major, head_major, padded):
        torch.testing.assert_close(vmod._lse_token_major(lse, cu, 5, 3), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="lse shape"):
        vmod._lse_token_major(torch.zeros(4, 4), cu, 5, 3)


# ------------------------------------------------------------------------------------- real GPU kernels


def _assert_within_eager_error(actual, oracle, eager, what):
    """DESIGN.md rule: the kernel's error vs the fp64 oracle is at most ~2x eager PyTorch's in that dtype."""
    err = (actual.double() - oracle).abs().max().item()
    eager_err = (eager.double() - oracle).abs().max().item()
    assert err <= 2 * eager_err + 1e-4, f"{what}: kernel error {err:.3g} vs eager {eager_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv", [2, 8])
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("backend", ["flash_attn", "torch"])
def test_gpu_backend_vs_fp64(backend, head_dim, hkv, dtype):
    if backend == "flash_attn" and not HAS_FLASH_ATTN:
        pytest.skip("flash-attn is not installed")
    gen = torch.Generator().manual_seed(71)
    lengths = random_lengths(gen, 7, 300)
    cu, total = cu_from_lengths(lengths, device="cuda"), sum(lengths)
    q = random_tensor(gen, total, 8, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    k, v = (
        random_tensor(gen, total, hkv, head_dim, dtype=dtype, device="cuda", requires_grad=True) for _ in "kv"
    )
    grad_out = random_tensor(gen, total, 8, head_dim, dtype=dtype, device="cuda")
    assert resolve_varlen_backend(q, backend=backend, return_lse=True) == backend

    out, lse = varlen_attention(q, k, v, cu, max(lengths), return_lse=True, backend=backend)
    out.backward(grad_out)
    grads = [t.grad for t in (q, k, v)]

    def dense(dtype_):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        o, l_ = dense_attention(*inputs, cu, cu, causal=True, dtype=dtype_)
        o.backward(grad_out.to(dtype_))
        return o, l_, [t.grad for t in inputs]

    oracle, oracle_lse, oracle_grads = dense(torch.float64)
    eager, _, eager_grads = dense(dtype)
    _assert_within_eager_error(out, oracle, eager, "out")
    for name, g, go, ge in zip("qkv", grads, oracle_grads, eager_grads, strict=True):
        _assert_within_eager_error(g, go, ge, f"d{name}")
    assert lse.shape == (total, 8) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch"])
def test_gpu_separate_keys_bottom_right(backend):
    if backend == "flash_attn" and not HAS_FLASH_ATTN:
        pytest.skip("flash-attn is not installed")
    gen = torch.Generator().manual_seed(81)
    len_q, len_k = [3, 1, 80, 5, 2], [100, 6, 80, 2, 0]
    cu_q, cu_k = cu_from_lengths(len_q, device="cuda"), cu_from_lengths(len_k, device="cuda")
    q = random_tensor(gen, sum(len_q), 8, 64, dtype=torch.bfloat16, device="cuda")
    k, v = (random_tensor(gen, sum(len_k), 2, 64, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    for causal in (True, False):
        out, lse = varlen_attention(
            q, k, v, cu_q, 80, causal=causal, cu_seqlens_k=cu_k, max_seqlen_k=100, return_lse=True,
            backend=backend,
        )  # fmt: skip
        ref_out, ref_lse = varlen_attention(
            q, k, v, cu_q, 80, causal=causal, cu_seqlens_k=cu_k, return_lse=True, backend="reference"
        )
        torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
        blind = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), blind) and blind.any()
        torch.testing.assert_close(lse[~blind], ref_lse[~blind], rtol=1e-3, atol=1e-3)
        assert torch.equal(out[blind[:, 0]], torch.zeros_like(out[blind[:, 0]]))
