"""varlen_attention's fused backends (flash-attn, torch varlen) on a CUDA device (``gpu`` marker; skipped
without one), against an fp64 oracle and eager PyTorch's own error."""

from __future__ import annotations

import pytest
import torch
from varlen_helpers import cu_from_lengths, dense_attention, random_lengths, random_tensor

from patchrec_kernels import runtime
from patchrec_kernels.varlen_attention import resolve_varlen_backend, varlen_attention

# ------------------------------------------------------------------------------------- real GPU kernels


def _assert_within_eager_error(actual, oracle, eager, what):
    """DESIGN.md rule: the kernel's error vs the fp64 oracle is at most ~2x eager PyTorch's in that dtype."""
    err = (actual.double() - oracle).abs().max().item()
    eager_err = (eager.double() - oracle).abs().max().item()
    assert err <= 2 * eager_err + 1e-4, f"{what}: kernel error {err:.3g} vs eager {eager_err:.3g}"


def _skip_unless_available(backend):
    problem = runtime.flash_attn_problem() if backend == "flash_attn" else None
    if problem is not None:
        pytest.skip(problem)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv", [2, 8])
@pytest.mark.parametrize("head_dim", [64, 40, 36, 100])  # 36, 100: torch's kernel needs them padded to % 8
@pytest.mark.parametrize("backend", ["flash_attn", "torch"])
def test_gpu_backend_vs_fp64(backend, head_dim, hkv, dtype):
    _skip_unless_available(backend)
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
    _skip_unless_available(backend)
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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch"])
def test_gpu_model_layout_and_gqa_beam_step(backend):
    """q/k/v as the model's attention hook passes them (views of [1, H, T, D]), and a GQA beam step with an
    empty query sequence and max_seqlen 1 (the upstream decode-path bug), on the real kernels."""
    _skip_unless_available(backend)
    gen = torch.Generator().manual_seed(83)
    lengths = [17, 1, 40]
    cu = cu_from_lengths(lengths, device="cuda")
    q, k, v = (
        random_tensor(gen, 1, heads, sum(lengths), 64, dtype=torch.bfloat16, device="cuda")[0].transpose(0, 1)
        for heads in (32, 8, 8)
    )
    out = varlen_attention(q, k, v, cu, 40, backend=backend)
    dense = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, 40, backend=backend)
    assert torch.equal(out, dense)

    len_q, len_k = [1, 0, 1, 1], [30, 12, 5, 64]
    cu_q, cu_k = cu_from_lengths(len_q, device="cuda"), cu_from_lengths(len_k, device="cuda")
    q = random_tensor(gen, sum(len_q), 32, 64, dtype=torch.bfloat16, device="cuda")
    k, v = (random_tensor(gen, sum(len_k), 8, 64, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    step = dict(cu_seqlens_k=cu_k, max_seqlen_k=64)
    out = varlen_attention(q, k, v, cu_q, 1, backend=backend, **step)
    expected = varlen_attention(q, k, v, cu_q, 1, backend="reference", **step)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_flash_attn_deterministic_backward_is_bitwise_reproducible():
    _skip_unless_available("flash_attn")
    gen = torch.Generator().manual_seed(87)
    lengths = [500, 3, 900, 257]
    cu, total = cu_from_lengths(lengths, device="cuda"), sum(lengths)
    leaves = [random_tensor(gen, total, h, 64, dtype=torch.bfloat16, device="cuda") for h in (32, 8, 8)]
    grad_out = random_tensor(gen, total, 32, 64, dtype=torch.bfloat16, device="cuda")
    grads = []
    for _ in range(2):
        inputs = [t.clone().requires_grad_(True) for t in leaves]
        varlen_attention(*inputs, cu, 900, deterministic=True, backend="flash_attn").backward(grad_out)
        grads.append([t.grad for t in inputs])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
