"""Throughput of ``varlen_attention``'s backends on a packed batch, against the padded SDPA call a stock
transformers model makes for the same sequences.

Providers:
- ``flash_attn`` / ``torch``: the fused backends (CUDA only; skipped when not available here);
- ``cpu``: torch's fused CPU flash kernel over groups of equal-length sequences (CPU only);
- ``reference``: the pure-PyTorch reference (per sequence, blocked);
- ``sdpa-padded``: the sequences right-padded to ``[B, H, longest, D]``, one
  ``F.scaled_dot_product_attention`` call with a causal-and-padding boolean mask and ``enable_gqa`` (what
  transformers' sdpa attention runs with an attention mask). Padding is laid out before timing: only the
  attention call is timed, padded rows included, as the model pays for them.

Shapes: CUDA: Llama-3.2-1B attention (32 query heads, 8 key/value heads, head_dim 64) in bf16 over 16
sequences of 200-2,000 rows (seeded; a vanilla prompt of 200 ML-1M items is ~1,800 rows). CPU: SmolLM2-135M's
attention (9 query heads, 3 key/value heads, head_dim 64) in fp32 over 4 sequences of 100-2,000 rows (a
vanilla SmolLM2 prompt at L = 100 is ~570 rows, at L = 350 ~2,000). Modes: ``fwd`` and ``both`` (forward +
backward). ``tflops`` counts the causal (useful) work only: 2 matmuls x 2 FLOPs x Hq x D x sum(L (L + 1) / 2),
x 3.5 with the backward (its 5 matmuls against the forward's 2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from machine import DEVICE, HAS_CUDA, device_name, measured_seconds, sync

from patchrec_kernels.varlen_attention import resolve_varlen_backend, varlen_attention

HQ, HKV, HEAD_DIM = (32, 8, 64) if HAS_CUDA else (9, 3, 64)
NUM_SEQ, MIN_LEN, MAX_LEN = (16, 200, 2000) if HAS_CUDA else (4, 100, 2000)
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
ROUNDS = 20 if HAS_CUDA else 5
PROVIDERS = ["flash_attn", "torch", "cpu", "reference", "sdpa-padded"]
MODES = ["fwd", "both"]
BASELINE = "torch" if HAS_CUDA else "cpu"  # the provider report ratios divide by (patchrec's fast path)


class Case:
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (NUM_SEQ,), generator=gen)
        total, longest = int(self.lengths.sum()), int(self.lengths.max())
        self.cu = F.pad(self.lengths.cumsum(0), (1, 0)).to(DEVICE, torch.int32)
        self.max_len = longest
        make = lambda heads: torch.randn(total, heads, HEAD_DIM, generator=gen).to(DEVICE, DTYPE)
        self.q, self.k, self.v = make(HQ), make(HKV), make(HKV)
        self.grad_out = make(HQ)
        # Padded layout [B, H, longest, D] and its boolean mask (True = attend).
        seq = torch.repeat_interleave(torch.arange(NUM_SEQ), self.lengths).to(DEVICE)
        pos = torch.arange(total, device=DEVICE) - self.cu[:-1].long()[seq]
        self.index = (seq, pos)
        valid = torch.arange(longest, device=DEVICE)[None] < self.lengths.to(DEVICE)[:, None]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=DEVICE).tril()
        self.mask = (causal[None] & valid[:, None, :])[:, None]
        self.padded = [self.pad(t) for t in (self.q, self.k, self.v)]
        useful = float((self.lengths * (self.lengths + 1) / 2).sum())
        self.fwd_flops = 2 * 2 * HQ * HEAD_DIM * useful

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros(NUM_SEQ, self.max_len, *packed.shape[1:])
        return out.index_put(self.index, packed).transpose(1, 2)  # [B, H, longest, D]

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.transpose(1, 2)[self.index]


@pytest.fixture(scope="module")
def case() -> Case:
    return Case()


def _attention(provider: str, case: Case, q, k, v):
    if provider == "sdpa-padded":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=case.mask, enable_gqa=True)
    return varlen_attention(q, k, v, case.cu, case.max_len, backend=provider, validate=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_varlen_attention_throughput(benchmark, case, provider, mode):
    if provider in ("flash_attn", "torch", "cpu"):
        try:
            resolve_varlen_backend(case.q, backend=provider)
        except ValueError as error:
            pytest.skip(str(error))
    inputs = case.padded if provider == "sdpa-padded" else [case.q, case.k, case.v]
    grad_out = case.pad(case.grad_out) if provider == "sdpa-padded" else case.grad_out

    # Every provider computes the same thing; check it before timing it.
    out = _attention(provider, case, *inputs)
    got = case.unpad(out) if provider == "sdpa-padded" else out
    expected = varlen_attention(case.q, case.k, case.v, case.cu, case.max_len, backend="reference")
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)

    if mode == "fwd":
        target, setup = (lambda: (_attention(provider, case, *inputs), sync())), None
    else:
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

        def setup():
            for t in leaves:
                t.grad = None
            return (), {}

        target = lambda: (_attention(provider, case, *leaves).backward(grad_out), sync())
    rounds = max(3, ROUNDS // 4) if provider == "reference" and HAS_CUDA else ROUNDS
    benchmark.group = "varlen_attention"
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    flops = case.fwd_flops * (1.0 if mode == "fwd" else 3.5)
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        reference=BASELINE,
        tokens=int(case.lengths.sum()),
        sequences=NUM_SEQ,
        longest=case.max_len,
        heads=f"{HQ}/{HKV}",
        head_dim=HEAD_DIM,
        dtype=str(DTYPE).removeprefix("torch."),
        tflops=flops / measured_seconds(benchmark) / 1e12,
        device=device_name(),
    )
