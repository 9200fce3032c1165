"""patch_embed on a CUDA device (``gpu`` marker; skipped without one): realistic and extreme shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from patch_embed_helpers import (
    MIXED_ROWS,
    assert_one_ulp,
    make_batch,
    random_grad,
    reference_grad,
)

from patchrec_kernels.patch_embed import patch_embed, patch_embed_bwd
from patchrec_kernels.reference.patch_embed import patch_embed_reference

# ---------------------------------------------------------------------------------------------- GPU only


def _pft_s_rows(num_samples, seed, history=100, group=5):
    """PFT-S-like rows: newest `group` items as text (a row per token), the next `group` as item patches,
    older ones as session patches of `group` items; title lengths 1..24 tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_samples):
        titles = rng.integers(1, 25, size=history).tolist()
        older, patches, text = titles[: -2 * group], titles[-2 * group : -group], titles[-group:]
        cut = len(older) % group
        sessions = ([older[:cut]] if cut else []) + [
            older[i : i + group] for i in range(cut, len(older), group)
        ]
        rows += sessions + [[n] for n in patches] + [[1] for n in text for _ in range(n)]
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [2048, 4096])
def test_gpu_large_bf16_matches_reference(dim):
    vocab = 128256
    rows = _pft_s_rows(64, seed=dim)
    batch = make_batch(rows, vocab, dim, dtype=torch.bfloat16, device="cuda", seed=37, id_dtype=torch.int32)
    assert len(rows) > 1000
    out = patch_embed(*batch, backend="triton")
    assert_one_ulp(out, patch_embed_reference(*batch))
    grad_out = random_grad(batch)
    expected = reference_grad(batch, grad_out)
    grads = {}
    for deterministic in (True, False):
        grads[deterministic] = patch_embed_bwd(grad_out, *batch.args[1:], vocab, deterministic=deterministic)
        assert_one_ulp(grads[deterministic], expected)
    again = patch_embed_bwd(grad_out, *batch.args[1:], vocab, deterministic=True)
    assert torch.equal(again, grads[True])


@pytest.mark.gpu
def test_gpu_fp32_thousands_of_text_rows():
    rows = [[1]] * 5000 + [[3, 7]] * 100
    batch = make_batch(rows, 128256, 2048, device="cuda", seed=41)
    out = patch_embed(*batch, backend="triton")
    torch.testing.assert_close(out, patch_embed_reference(*batch), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:5000], batch.weight[batch.token_ids[:5000]])


@pytest.mark.gpu
def test_gpu_table_beyond_two_to_the_31_elements():
    """64-bit addressing: V * D > 2^31 elements, ids near the end of the table (offsets past int32)."""
    vocab, dim = 1_100_000, 2048
    assert vocab * dim > 2**31
    rows = [[1]] * 40 + [[7], [3, 5, 2]] * 10
    gen = torch.Generator().manual_seed(59)
    ids = torch.randint(vocab - 50_000, vocab, (sum(map(sum, rows)),), generator=gen)
    ids[::7] = torch.arange(ids[::7].numel())  # and a few from the start of the table
    small = make_batch(rows, 1, 1, device="cuda", id_dtype=torch.int32, token_ids=ids)
    weight = torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16)
    batch = small._replace(weight=weight)
    out = patch_embed(*batch, backend="triton")
    assert_one_ulp(out, patch_embed_reference(*batch))

    # The gradient rows of the ids used, against the reference over the compacted table of those rows.
    used, compact_ids = torch.unique(batch.token_ids, return_inverse=True)
    compact = batch._replace(weight=weight[used.long()], token_ids=compact_ids.to(torch.int32))
    grad_out = random_grad(batch)
    expected = reference_grad(compact, grad_out)
    for deterministic in (True, False):
        grad = patch_embed_bwd(grad_out, *batch.args[1:], vocab, deterministic=deterministic)
        assert_one_ulp(grad[used.long()], expected)
        assert torch.count_nonzero(grad).item() == torch.count_nonzero(grad[used.long()]).item()
        del grad


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_device_that_is_not_current():
    batch = make_batch(MIXED_ROWS, 300, 576, dtype=torch.bfloat16, device="cuda:1", seed=61)
    grad_out = random_grad(batch)
    with torch.cuda.device(0):
        out = patch_embed(*batch, backend="triton")
        grads = [patch_embed_bwd(grad_out, *batch.args[1:], 300, deterministic=d) for d in (True, False)]
    assert out.device == torch.device("cuda", 1)
    assert_one_ulp(out, patch_embed_reference(*batch))
    for grad in grads:
        assert_one_ulp(grad, reference_grad(batch, grad_out))

