"""Throughput of patch_embed against the ways one would otherwise build the packed input embeddings.

Providers:
- ``triton`` / ``triton_atomic``: the fused kernels (CUDA only; the interpreter is far too slow to time),
  deterministic (sorted) and atomic backward.
- ``reference``: the eager pure-PyTorch reference (gathers a [T, D] tensor, then two index_adds).
- ``embedding_bag``: one ``F.embedding_bag(mode="sum")`` call, one bag per output row, with per-token
  weights 1 / (segments in row * tokens in segment) (``mode="mean"`` refuses per-sample weights). Bags are
  the output rows in order, so its [R, D] result already is the packed buffer.
- ``loop``: per sample and per item ``weight[ids].mean(0)``, then ``torch.cat``, as the authors' released
  trainer builds its inputs.

Shapes: 64 samples x 100 ML-1M items (Llama-3 title lengths and ids), V = 128256, D = 2048, bf16 on CUDA;
8 samples, D = 256, fp32 without CUDA so the run stays short. Plans PFT-I (K = 5) and PFT-S (G = 5).

Bytes model for GB/s (``extra_info``): forward = embedding rows read (T * D) + output written (R * D);
backward = grad_out rows read once per token use (T * D) + the dense [V, D] gradient written (every
provider writes all of it); both = the sum. Elements times the table's element size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from machine import DEVICE, DTYPE, HAS_CUDA, SHARED, measured_seconds, sync

if not (SHARED / "data" / "patchrec" / "ml-1m").exists() or not (SHARED / "tokenizers" / "llama3").exists():
    pytest.skip(f"{SHARED} (ML-1M titles, Llama-3 tokenizer) not available", allow_module_level=True)

from shapes import LLAMA3_VOCAB, PackedBatch, packed_history_batch  # noqa: E402

from patchrec_kernels.patch_embed import (  # noqa: E402
    patch_embed,
    patch_embed_bwd,
    patch_embed_fwd,
    token_scale,
)
from patchrec_kernels.reference.patch_embed import patch_embed_reference  # noqa: E402

NUM_SAMPLES = 64 if HAS_CUDA else 8
DIM = 2048 if HAS_CUDA else 256
ROUNDS = 30 if HAS_CUDA else 20
PROVIDERS = ["triton", "triton_atomic", "reference", "embedding_bag", "loop"]
MODES = ["fwd", "bwd", "both"]



class Case:
    """One plan's packed batch on the device, with its table, upstream gradient and loop pieces."""

    def __init__(self, plan: str):
        batch: PackedBatch = packed_history_batch(plan, num_samples=NUM_SAMPLES).to(DEVICE)
        gen = torch.Generator().manual_seed(0)
        self.plan, self.info = plan, batch.info()
        self.index = (batch.token_ids, batch.seg_offsets, batch.row_offsets)
        self.weight = torch.randn(LLAMA3_VOCAB, DIM, generator=gen).to(DEVICE, DTYPE).requires_grad_()
        self.grad_out = torch.randn(self.info["rows"], DIM, generator=gen).to(DEVICE, DTYPE)
        # Id tensors are made up front: the loop baseline is timed on its torch ops, not on list handling.
        as_ids = lambda title: torch.tensor(title, dtype=torch.int64, device=DEVICE)
        self.pieces = [
            [(kind, [as_ids(t) for t in titles]) for kind, titles in sample] for sample in batch.samples
        ]

    def bytes_moved(self, mode: str) -> int:
        size = self.weight.element_size()
        fwd = (self.info["tokens"] + self.info["rows"]) * DIM * size
        bwd = (self.info["tokens"] + LLAMA3_VOCAB) * DIM * size
        return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[mode]


def _embedding_bag(weight, token_ids, seg_offsets, row_offsets):
    scale = token_scale(seg_offsets, row_offsets, token_ids.numel()).to(weight.dtype)
    bag_starts = seg_offsets[row_offsets[:-1]]
    return F.embedding_bag(token_ids, weight, bag_starts, mode="sum", per_sample_weights=scale)


def _loop(weight, pieces):
    samples = []
    for sample in pieces:
        parts = []
        for kind, titles in sample:
            if kind == "text":
                parts.append(weight[titles[0]])
            elif kind == "item":
                parts.append(weight[titles[0]].mean(0, keepdim=True))
            else:
                parts.append(torch.stack([weight[ids].mean(0) for ids in titles]).mean(0, keepdim=True))
        samples.append(torch.cat(parts))
    return torch.cat(samples)


def _forward(provider: str, case: Case, weight: torch.Tensor) -> torch.Tensor:
    if provider in ("triton", "triton_atomic"):
        deterministic = provider == "triton"
        return patch_embed(weight, *case.index, deterministic=deterministic, validate=False, backend="triton")
    if provider == "reference":
        return patch_embed_reference(weight, *case.index)
    if provider == "embedding_bag":
        return _embedding_bag(weight, *case.index)
    return _loop(weight, case.pieces)


@pytest.fixture(scope="module", params=["pft_i", "pft_s"])
def case(request) -> Case:
    return Case(request.param)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patch_embed_throughput(benchmark, case, provider, mode):
    if provider.startswith("triton") and not HAS_CUDA:
        pytest.skip("Triton is timed on CUDA only (the CPU interpreter is a correctness tool)")
    if provider == "triton_atomic" and mode == "fwd":
        pytest.skip("same forward as triton")
    if provider == "loop" and mode != "fwd" and not HAS_CUDA:
        # Each per-item gather's backward materialises and accumulates a dense [V, D] gradient (~800 of
        # them here): one round took 85 s on the 2-core CPU machine.
        pytest.skip("loop backward makes a dense [V, D] gradient per item; too slow to time on CPU")
    weight, grad_out = case.weight, case.grad_out

    # Every provider computes the same thing; check it before timing it.
    expected = patch_embed_reference(weight.detach(), *case.index).float()
    got = _forward(provider, case, weight.detach()).float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)

    if mode == "fwd":
        if provider.startswith("triton"):
            run = lambda: patch_embed_fwd(weight.detach(), *case.index)
        else:
            run = lambda: _forward(provider, case, weight.detach())
        target, setup = (lambda: (run(), sync())), None
    elif mode == "bwd" and provider.startswith("triton"):
        deterministic = provider == "triton"
        bwd = lambda: patch_embed_bwd(grad_out, *case.index, LLAMA3_VOCAB, deterministic=deterministic)
        target, setup = (lambda: (bwd(), sync())), None
    elif mode == "bwd":

        def setup():
            weight.grad = None
            out = _forward(provider, case, weight)
            sync()
            return (out,), {}

        target = lambda out: (out.backward(grad_out), sync())
    else:

        def setup():
            weight.grad = None
            return (), {}

        target = lambda: (_forward(provider, case, weight).backward(grad_out), sync())

    # The loop's backward costs seconds per round (a dense [V, D] gradient per item): a few rounds suffice.
    rounds = 3 if provider == "loop" and mode != "fwd" else ROUNDS
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    median = measured_seconds(benchmark)
    moved = case.bytes_moved(mode)
    benchmark.extra_info.update(
        case.info,
        plan=case.plan,
        provider=provider,
        mode=mode,
        vocab=LLAMA3_VOCAB,
        dim=DIM,
        dtype=str(DTYPE).removeprefix("torch."),
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        bytes=moved,
        gb_per_s=moved / median / 1e9,
        bytes_model="fwd: (T + R) * D; bwd: T * D grad_out reads + V * D dense grad writes; x element size",
    )
