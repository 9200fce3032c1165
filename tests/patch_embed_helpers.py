"""Shared by the patch_embed tests: batch builders, an fp64 oracle independent of both implementations,
and the tolerance rule of DESIGN.md."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from patchrec_kernels.reference.patch_embed import patch_embed_reference

# Rows given as lists of segment lengths: text tokens (one segment of one token), item patches (one
# segment of a title), session patches (several titles), including one-token titles inside sessions.
MIXED_ROWS = [[1], [1], [7], [3, 1, 5], [1], [2, 2, 9, 1, 4], [16], [1, 1]]


class Batch(NamedTuple):
    weight: torch.Tensor
    token_ids: torch.Tensor
    seg_offsets: torch.Tensor
    row_offsets: torch.Tensor

    @property
    def args(self):
        return self.weight, self.token_ids, self.seg_offsets, self.row_offsets


def make_batch(
    rows,
    vocab,
    dim,
    *,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    id_dtype=torch.int64,
    seg_dtype=torch.int64,
    row_dtype=torch.int64,
    token_ids=None,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    seg_lens = [n for row in rows for n in row]
    seg_offsets = np.concatenate([[0], np.cumsum(seg_lens)])
    row_offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])])
    if token_ids is None:
        token_ids = torch.randint(0, vocab, (int(seg_offsets[-1]),), generator=gen)
    # Normal draws are never exactly zero, so a kernel that drops a term cannot pass by accident.
    weight = torch.randn(vocab, dim, generator=gen)
    return Batch(
        weight.to(dtype).to(device),
        torch.as_tensor(token_ids, dtype=id_dtype, device=device),
        torch.as_tensor(seg_offsets, dtype=seg_dtype, device=device),
        torch.as_tensor(row_offsets, dtype=row_dtype, device=device),
    )


def random_grad(batch: Batch, seed=1) -> torch.Tensor:
    rows = batch.row_offsets.numel() - 1
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(rows, batch.weight.shape[1], generator=gen)
    return grad.to(batch.weight.dtype).to(batch.weight.device)


def averaging_matrix(batch: Batch) -> np.ndarray:
    """[R, V] float64 matrix with out = A @ weight, from plain loops, independent of both implementations."""
    ids = batch.token_ids.tolist()
    seg = batch.seg_offsets.tolist()
    row = batch.row_offsets.tolist()
    matrix = np.zeros((len(row) - 1, batch.weight.shape[0]), dtype=np.float64)
    for r in range(len(row) - 1):
        segments = range(row[r], row[r + 1])
        for s in segments:
            tokens = range(seg[s], seg[s + 1])
            for t in tokens:
                matrix[r, ids[t]] += 1.0 / (len(segments) * len(tokens))
    return matrix


def oracle_forward(batch: Batch) -> torch.Tensor:
    return torch.from_numpy(averaging_matrix(batch) @ batch.weight.double().cpu().numpy())


def oracle_backward(batch: Batch, grad_out: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(averaging_matrix(batch).T @ grad_out.double().cpu().numpy())


def eager_same_dtype(weight, token_ids, seg_offsets, row_offsets):
    """What eager PyTorch gives in the table's own dtype (the released trainer's per-item ``.mean(0)``)."""
    seg, row = seg_offsets.tolist(), row_offsets.tolist()
    out = []
    for r in range(len(row) - 1):
        means = [weight[token_ids[seg[s] : seg[s + 1]]].mean(0) for s in range(row[r], row[r + 1])]
        out.append(torch.stack(means).mean(0))
    return torch.stack(out)


def eager_same_dtype_grad(batch: Batch, grad_out: torch.Tensor) -> torch.Tensor:
    weight = batch.weight.detach().clone().requires_grad_()
    eager_same_dtype(weight, *batch.args[1:]).backward(grad_out)
    return weight.grad


def assert_dtype_tolerance(actual, oracle, eager, *, floor=1e-5):
    """DESIGN.md tolerance rule.

    fp32 agrees with the fp64 oracle to ~1e-5 relative. In bf16/fp16 the kernel's max error against the fp64
    oracle is at most twice eager PyTorch's error doing the same in that dtype, plus a tiny absolute floor
    (both are exact when every row is a single token).
    """
    actual, oracle = actual.detach().double().cpu(), oracle.double().cpu()
    assert torch.isfinite(actual).all()
    if actual.shape != oracle.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(oracle.shape)}")
    if eager.dtype == torch.float32:
        torch.testing.assert_close(actual, oracle, rtol=1e-5, atol=1e-6)
        return
    err = (actual - oracle).abs().max().item()
    eager_err = (eager.detach().double().cpu() - oracle).abs().max().item()
    assert err <= 2 * eager_err + floor, f"error {err:.3g} vs eager {eager.dtype} error {eager_err:.3g}"


def assert_one_ulp(actual, expected):
    """Kernel and reference both accumulate in fp32 and round once, so they differ by at most one ulp."""
    eps = torch.finfo(expected.dtype).eps if expected.dtype != torch.float32 else 1e-5
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=eps, atol=1e-6)


def reference_grad(batch: Batch, grad_out: torch.Tensor) -> torch.Tensor:
    weight = batch.weight.detach().clone().requires_grad_()
    patch_embed_reference(weight, *batch.args[1:]).backward(grad_out)
    return weight.grad


