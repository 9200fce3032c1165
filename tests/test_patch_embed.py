"""patch_embed: fused Triton kernels vs the pure-PyTorch reference vs an independent fp64 oracle.

Without CUDA the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), which is slow, so
the CPU shapes are tiny; the large, realistic shapes are in test_patch_embed_gpu.py, the input checks and
backend dispatch in test_patch_embed_checks.py.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from patch_embed_helpers import (
    MIXED_ROWS,
    Batch,
    assert_dtype_tolerance,
    assert_one_ulp,
    eager_same_dtype,
    eager_same_dtype_grad,
    make_batch,
    oracle_backward,
    oracle_forward,
    random_grad,
    reference_grad,
)

from patchrec_kernels.patch_embed import patch_embed, patch_embed_bwd, patch_embed_fwd
from patchrec_kernels.reference.patch_embed import patch_embed_reference
from patchrec_kernels.runtime import launch_device

# The package re-exports the op under the module's name, so fetch the module itself.
pe_module = importlib.import_module("patchrec_kernels.patch_embed")


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


