"""patch_embed: fused Triton kernels vs the pure-PyTorch reference vs an independent fp64 oracle.

Without CUDA the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), which is slow, so
the CPU shapes are tiny; the large, realistic shapes are in the ``gpu``-marked tests at the bottom.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import types
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchrec_kernels.reference.patch_embed as ref_module
from patchrec_kernels.patch_embed import patch_embed, patch_embed_bwd, patch_embed_fwd
from patchrec_kernels.reference.patch_embed import patch_embed_reference
from patchrec_kernels.runtime import launch_device

# The package re-exports the op under the module's name, so fetch the module itself.
pe_module = importlib.import_module("patchrec_kernels.patch_embed")

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


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    ("dtype", "dim", "index_dtypes"),
    [
        (torch.float32, 123, (torch.int64, torch.int64, torch.int64)),
        (torch.float32, 1, (torch.int32, torch.int32, torch.int32)),
        (torch.float32, 67, (torch.int32, torch.int64, torch.int32)),
        (torch.bfloat16, 123, (torch.int64, torch.int32, torch.int64)),
        (torch.bfloat16, 67, (torch.int32, torch.int32, torch.int32)),
        (torch.float16, 123, (torch.int64, torch.int64, torch.int32)),
    ],
)
def test_forward_matches_reference_and_oracle(kernel_device, dtype, dim, index_dtypes):
    id_dtype, seg_dtype, row_dtype = index_dtypes
    dtypes = dict(id_dtype=id_dtype, seg_dtype=seg_dtype, row_dtype=row_dtype)
    batch = make_batch(MIXED_ROWS, 29, dim, dtype=dtype, device=kernel_device, **dtypes)
    out = patch_embed(*batch.args, backend="triton")
    ref = patch_embed_reference(*batch.args)
    assert out.dtype == dtype and out.shape == (len(MIXED_ROWS), dim)
    assert_one_ulp(out, ref)
    oracle = oracle_forward(batch)
    eager = eager_same_dtype(*batch.args)
    assert_dtype_tolerance(out, oracle, eager)
    assert_dtype_tolerance(ref, oracle, eager)


def test_forward_poisoned_output_is_fully_written(kernel_device):
    batch = make_batch(MIXED_ROWS, 17, 67, device=kernel_device, seed=3)
    out = torch.full((len(MIXED_ROWS), 67), float("nan"), device=kernel_device)
    result = patch_embed_fwd(*batch.args, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, patch_embed_reference(*batch.args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rows",
    [[[1]], [[12]], [[3, 1, 4, 1, 5]], [[1]] * 5],
    ids=["one-token", "one-item-patch", "one-session", "text-only"],
)
def test_single_row_and_text_only_batches(kernel_device, rows):
    batch = make_batch(rows, 11, 123, device=kernel_device, seed=5)
    out = patch_embed(*batch.args, backend="triton")
    assert_dtype_tolerance(out, oracle_forward(batch), out.float())
    if rows[0] == [1]:
        # A text token is its embedding row, copied exactly (scale 1.0).
        assert torch.equal(out, batch.weight[batch.token_ids.long()])


def test_strided_views_are_handled(kernel_device):
    # A column slice of a wider table (row stride != D) and index tensors that are strided views.
    batch = make_batch(MIXED_ROWS, 13, 40, device=kernel_device, seed=43)
    wide = torch.randn(13, 50, device=kernel_device)
    wide[:, 5:45] = batch.weight
    spread = lambda t: torch.stack([t, torch.full_like(t, -7)], dim=1).reshape(-1)[::2]
    strided = Batch(
        wide[:, 5:45], spread(batch.token_ids), spread(batch.seg_offsets), spread(batch.row_offsets)
    )
    assert not strided.token_ids.is_contiguous() and strided.weight.stride(0) == 50
    out = patch_embed(*strided, backend="triton")
    torch.testing.assert_close(out, patch_embed_reference(*batch), rtol=1e-5, atol=1e-6)
    grad_out = random_grad(batch)
    grad = patch_embed_bwd(grad_out.t().contiguous().t(), *strided.args[1:], 13)
    torch.testing.assert_close(grad, reference_grad(batch, grad_out), rtol=1e-5, atol=1e-6)


def test_launchers_refuse_an_unusable_out_buffer(kernel_device):
    batch = make_batch(MIXED_ROWS, 13, 8, device=kernel_device)
    with pytest.raises(ValueError, match="^out"):
        patch_embed_fwd(*batch, out=torch.empty(8, len(MIXED_ROWS), device=kernel_device).t())
    with pytest.raises(ValueError, match="^out"):
        patch_embed_bwd(random_grad(batch), *batch.args[1:], 13, out=torch.empty(13, 8, dtype=torch.float16))


def test_block_d_pads_d_the_least():
    # (D, block): one block up to 64 columns; above, the widest of 256/128/64 with the fewest padded lanes.
    cases = [(1, 1), (5, 8), (64, 64), (67, 128), (123, 128), (200, 256), (576, 64), (896, 128), (960, 64),
             (2048, 256), (2304, 256), (4096, 256)]  # fmt: skip
    assert [(dim, pe_module._block_d(dim)) for dim in (d for d, _ in cases)] == cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_d_block(kernel_device, monkeypatch, dtype):
    """D = 576 as nine 64-wide blocks (the choice) or three 256-wide ones (the former): each column sums the
    same tokens in the same order, so forward and both backward modes agree bit for bit."""
    batch = make_batch(MIXED_ROWS, 21, 576, dtype=dtype, device=kernel_device, seed=47, id_dtype=torch.int32)
    grad_out = random_grad(batch)

    def run():
        grads = [patch_embed_bwd(grad_out, *batch.args[1:], 21, deterministic=d) for d in (True, False)]
        return [patch_embed_fwd(*batch.args), *grads]

    assert pe_module._block_d(576) == 64
    chosen = run()
    monkeypatch.setattr(pe_module, "_block_d", lambda dim: 256)
    for new, old in zip(chosen, run(), strict=True):
        assert torch.equal(new, old)
    assert_one_ulp(chosen[0], patch_embed_reference(*batch.args))


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each launcher enters its data's device first."""
    entered, launched = [], []

    @contextlib.contextmanager
    def spy_device(tensor):
        entered.append(tensor)
        yield
        entered.pop()

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, list(entered), args[0]))

    kernels = ["_patch_embed_fwd_kernel", "_patch_embed_bwd_sorted_kernel", "_patch_embed_bwd_atomic_kernel"]
    monkeypatch.setattr(pe_module, "launch_device", spy_device)
    for name in kernels:
        monkeypatch.setattr(pe_module, name, Stub(name))
    batch = make_batch(MIXED_ROWS, 9, 16, seed=53)
    patch_embed_fwd(*batch.args)
    for deterministic in (True, False):
        patch_embed_bwd(random_grad(batch), *batch.args[1:], 9, deterministic=deterministic)
    assert [name for name, _, _ in launched] == kernels
    # Inside exactly one device context, entered for the tensor the kernel reads first.
    assert all(len(inside) == 1 and inside[0] is first for _, inside, first in launched)


def test_launch_device_is_the_tensors_cuda_device():
    assert isinstance(launch_device(torch.zeros(1)), contextlib.nullcontext)
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    context = launch_device(on_gpu1)
    assert isinstance(context, torch.cuda.device) and context.idx == 1


# ---------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize(("dtype", "dim"), [(torch.float32, 123), (torch.bfloat16, 67), (torch.float16, 5)])
def test_backward_matches_reference_and_oracle(kernel_device, deterministic, dtype, dim):
    batch = make_batch(MIXED_ROWS, 23, dim, dtype=dtype, device=kernel_device, seed=7, id_dtype=torch.int32)
    grad_out = random_grad(batch)
    grad = patch_embed_bwd(grad_out, *batch.args[1:], batch.weight.shape[0], deterministic=deterministic)
    assert grad.dtype == dtype and grad.shape == batch.weight.shape
    assert_one_ulp(grad, reference_grad(batch, grad_out))
    assert_dtype_tolerance(grad, oracle_backward(batch, grad_out), eager_same_dtype_grad(batch, grad_out))


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_ids_accumulate(kernel_device, deterministic, dtype):
    # 60 tokens over 2 ids: runs much longer than BLOCK_T (sorted mode), many writers per row (atomic).
    rows = [[1]] * 10 + [[20], [5, 5, 5], [1, 2, 3, 4, 5]]
    ids = [0, 2, 2] * 20
    batch = make_batch(rows, 5, 33, dtype=dtype, device=kernel_device, seed=11, token_ids=ids)
    grad_out = random_grad(batch)
    grad = patch_embed_bwd(grad_out, *batch.args[1:], 5, deterministic=deterministic)
    assert_dtype_tolerance(grad, oracle_backward(batch, grad_out), eager_same_dtype_grad(batch, grad_out))
    # Ids 1, 3 and 4 never occur: their gradient rows must be exactly zero.
    assert torch.count_nonzero(grad[[1, 3, 4]]) == 0


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_backward_poisoned_output_is_fully_written(kernel_device, deterministic):
    batch = make_batch(MIXED_ROWS, 40, 67, device=kernel_device, seed=13)
    grad_out = random_grad(batch)
    out = torch.full((40, 67), float("nan"), device=kernel_device)
    patch_embed_bwd(grad_out, *batch.args[1:], 40, deterministic=deterministic, out=out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_grad(batch, grad_out), rtol=1e-5, atol=1e-6)
    unused = sorted(set(range(40)) - set(batch.token_ids.tolist()))
    assert unused and torch.count_nonzero(out[unused]) == 0


def test_deterministic_backward_is_bitwise_reproducible(kernel_device):
    rows = [[4, 4, 4], [9], [1]] * 3 + [[1, 2, 3, 3], [2, 3, 4, 4]] + [[1]] * 5
    num_tokens = sum(map(sum, rows))
    # Frequent ids (3 and 1) so that different summation orders would show up in the low bits.
    ids = [[3, 1, 3, 3, 0, 1, 5][t % 7] for t in range(num_tokens)]
    batch = make_batch(rows, 6, 45, dtype=torch.bfloat16, device=kernel_device, seed=17, token_ids=ids)
    grads = []
    for _ in range(2):
        weight = batch.weight.detach().clone().requires_grad_()
        patch_embed(weight, *batch.args[1:], backend="triton", deterministic=True).backward(
            random_grad(batch)
        )
        grads.append(weight.grad)
    assert torch.equal(grads[0], grads[1])
    assert_one_ulp(grads[0], reference_grad(batch, random_grad(batch)))


def test_autograd_gradients_reach_weight_only(kernel_device):
    batch = make_batch(MIXED_ROWS, 19, 35, device=kernel_device, seed=19)
    weight = batch.weight.detach().clone().requires_grad_()
    out = patch_embed(weight, *batch.args[1:], backend="triton")
    assert type(out.grad_fn).__name__ == "PatchEmbedFunctionBackward"
    grad_out = random_grad(batch)
    out.backward(grad_out)
    torch.testing.assert_close(weight.grad, reference_grad(batch, grad_out), rtol=1e-5, atol=1e-6)
    assert all(not t.requires_grad for t in batch.args[1:])


@st.composite
def ragged_structures(draw):
    rows = draw(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1, max_size=6))
    index_dtype = st.sampled_from([torch.int32, torch.int64])
    return dict(
        rows=rows,
        vocab=draw(st.integers(1, 24)),
        dim=draw(st.sampled_from([1, 3, 16, 67])),
        seed=draw(st.integers(0, 2**16)),
        id_dtype=draw(index_dtype),
        seg_dtype=draw(index_dtype),
        row_dtype=draw(index_dtype),
    )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(case=ragged_structures())
def test_random_ragged_structures(case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = make_batch(device=device, **case)
    out = patch_embed_fwd(*batch.args)
    torch.testing.assert_close(out, patch_embed_reference(*batch.args), rtol=1e-5, atol=1e-6)
    grad_out = random_grad(batch)
    expected = oracle_backward(batch, grad_out)
    for deterministic in (True, False):
        grad = patch_embed_bwd(grad_out, *batch.args[1:], case["vocab"], deterministic=deterministic)
        torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_fp64_oracle(dtype):
    rows = MIXED_ROWS + [[1] * 6, [30], [2, 8]]
    batch = make_batch(rows, 37, 48, dtype=dtype, seed=23)
    out = patch_embed_reference(*batch.args)
    assert out.dtype == dtype
    assert_dtype_tolerance(out, oracle_forward(batch), eager_same_dtype(*batch.args))
    grad_out = random_grad(batch)
    expected = oracle_backward(batch, grad_out)
    assert_dtype_tolerance(reference_grad(batch, grad_out), expected, eager_same_dtype_grad(batch, grad_out))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_batch_gives_empty_output_and_zero_grad(kernel_device, backend):
    empty = torch.zeros(1, dtype=torch.int64, device=kernel_device)
    weight = torch.randn(7, 9, device=kernel_device, requires_grad=True)
    out = patch_embed(weight, empty[:0], empty, empty, backend=backend)
    assert out.shape == (0, 9)
    out.sum().backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


# -------------------------------------------------------------------------------------- checks, dispatch


def _good_cpu_batch() -> Batch:
    return make_batch([[2, 1], [3]], 5, 4, seed=29)


def _replace(**changes):
    return lambda b: b._replace(**changes)


_ONE_ROW_NO_SEGMENTS = dict(
    row_offsets=torch.tensor([0, 1]),
    seg_offsets=torch.tensor([0]),
    token_ids=torch.zeros(0, dtype=torch.int64),
)
_BAD_INPUTS = {
    "weight-1d": (_replace(weight=torch.randn(5)), "weight", "2-D"),
    "weight-int": (_replace(weight=torch.ones(5, 4, dtype=torch.int64)), "weight", "float"),
    "weight-fp64": (_replace(weight=torch.randn(5, 4, dtype=torch.float64)), "weight", "float"),
    "ids-float": (lambda b: b._replace(token_ids=b.token_ids.float()), "token_ids", "int32/int64"),
    "ids-2d": (lambda b: b._replace(token_ids=b.token_ids[None]), "token_ids", "1-D"),
    "ids-list": (lambda b: b._replace(token_ids=b.token_ids.tolist()), "token_ids", "Tensor"),
    "ids-other-device": (lambda b: b._replace(token_ids=b.token_ids.to("meta")), "token_ids", "is on meta"),
    "seg-int16": (lambda b: b._replace(seg_offsets=b.seg_offsets.short()), "seg_offsets", "int32/int64"),
    "seg-empty": (_replace(seg_offsets=torch.zeros(0, dtype=torch.int64)), "seg_offsets", "at least one"),
    "seg-not-from-0": (_replace(seg_offsets=torch.tensor([1, 2, 3, 6])), "seg_offsets", "start at 0"),
    "seg-not-to-T": (_replace(seg_offsets=torch.tensor([0, 2, 3, 5])), "seg_offsets", "end at"),
    "seg-decreasing": (_replace(seg_offsets=torch.tensor([0, 4, 3, 6])), "seg_offsets", "non-decreasing"),
    "seg-empty-segment": (_replace(seg_offsets=torch.tensor([0, 3, 3, 6])), "seg_offsets", "empty"),
    "seg-without-tokens": (_replace(token_ids=torch.zeros(0, dtype=torch.int64)), "seg_offsets", "0 tokens"),
    "rows-2d": (lambda b: b._replace(row_offsets=b.row_offsets[None]), "row_offsets", "1-D"),
    "rows-other-device": (lambda b: b._replace(row_offsets=b.row_offsets.to("meta")), "row_offsets", "meta"),
    "rows-empty": (_replace(row_offsets=torch.zeros(0, dtype=torch.int32)), "row_offsets", "at least one"),
    "rows-not-from-0": (_replace(row_offsets=torch.tensor([1, 2, 3])), "row_offsets", "start at 0"),
    "rows-not-to-S": (_replace(row_offsets=torch.tensor([0, 2])), "row_offsets", "end at"),
    "rows-decreasing": (_replace(row_offsets=torch.tensor([0, 2, 1, 3])), "row_offsets", "non-decreasing"),
    "rows-empty-row": (_replace(row_offsets=torch.tensor([0, 0, 3])), "row_offsets", "empty"),
    "rows-none-over-segments": (_replace(row_offsets=torch.tensor([0])), "row_offsets", "0 rows"),
    "rows-without-segments": (_replace(**_ONE_ROW_NO_SEGMENTS), "row_offsets", "0 segments"),
    "id-negative": (_replace(token_ids=torch.tensor([0, -1, 2, 3, 4, 1])), "token_ids", r"\[0, 5\)"),
    "id-equal-V": (_replace(token_ids=torch.tensor([0, 1, 2, 3, 4, 5])), "token_ids", r"\[0, 5\)"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS), ids=list(_BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    mutate, name, detail = _BAD_INPUTS[case]
    batch = mutate(_good_cpu_batch())
    with pytest.raises(ValueError, match=rf"^{name}\b.*{detail}"):
        patch_embed(*batch)


def test_good_batch_passes_checks_and_unknown_backend_raises():
    batch = _good_cpu_batch()
    assert patch_embed(*batch, backend="reference").shape == (2, 4)
    with pytest.raises(ValueError, match="^backend"):
        patch_embed(*batch, backend="cuda")


@pytest.mark.parametrize("case", ["weight-int", "ids-float", "rows-other-device", "seg-without-tokens"])
def test_structure_checks_run_even_without_validation(case):
    mutate, name, _ = _BAD_INPUTS[case]
    with pytest.raises(ValueError, match=f"^{name}"):
        patch_embed(*mutate(_good_cpu_batch()), validate=False)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_value_checks_switch_off_per_call_and_by_env(kernel_device, backend, monkeypatch):
    # An empty segment is invalid but harmless to launch: every index stays in bounds.
    batch = make_batch([[3], [1, 2]], 5, 4, device=kernel_device, seed=31)
    batch = batch._replace(seg_offsets=torch.tensor([0, 3, 3, 6], device=kernel_device))
    with pytest.raises(ValueError, match="^seg_offsets.*empty"):
        patch_embed(*batch, backend=backend)
    assert patch_embed(*batch, backend=backend, validate=False).shape == (2, 4)
    monkeypatch.setenv("PATCHREC_KERNELS_VALIDATE", "0")
    assert patch_embed(*batch, backend=backend).shape == (2, 4)
    with pytest.raises(ValueError, match="^seg_offsets"):
        patch_embed(*batch, backend=backend, validate=True)


def test_auto_uses_reference_on_cpu_without_interpreter(monkeypatch):
    batch = _good_cpu_batch()
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def no_kernel(*args):
        raise AssertionError("a Triton launch on a CPU tensor without the interpreter crashes")

    monkeypatch.setattr(pe_module.PatchEmbedFunction, "apply", no_kernel)
    out = patch_embed(*batch)
    torch.testing.assert_close(out, patch_embed_reference(*batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^backend='triton' cannot run on a cpu tensor"):
        patch_embed(*batch, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter dispatch")
def test_auto_uses_interpreted_kernel_on_cpu_when_interpreter_is_on(monkeypatch):
    def no_reference(*args):
        raise AssertionError("auto should have chosen the Triton interpreter")

    monkeypatch.setattr(ref_module, "patch_embed_reference", no_reference)
    batch = _good_cpu_batch()
    assert pe_module.triton_can_run(batch.weight)
    weight = batch.weight.requires_grad_()
    out = patch_embed(weight, *batch.args[1:])
    assert type(out.grad_fn).__name__ == "PatchEmbedFunctionBackward"
    torch.testing.assert_close(out, patch_embed_fwd(*batch), rtol=0, atol=0)


def _imported_modules(module, *, inside=None) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    if inside is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == inside)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_public_dispatch_imports_the_reference():
    everywhere = _imported_modules(pe_module)
    in_dispatch = _imported_modules(pe_module, inside="patch_embed")
    assert "patchrec_kernels.reference.patch_embed" in in_dispatch
    assert {m for m in everywhere - in_dispatch if "reference" in m} == set()
    assert not any("patch_embed" in m or "triton" in m for m in _imported_modules(ref_module))


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
