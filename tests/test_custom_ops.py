"""The kernels as torch.library custom ops: ``torch.library.opcheck`` (schema, fake and meta kernels, autograd
registration, AOT tracing with dynamic shapes), the reference attention's explicit backward, the FLOP formulas
under FlopCounterMode, meta tensors, and the public ops under torch.compile: compiled equals eager forward and
backward in one graph (fullgraph), and new packed shapes compile nothing new (aot_eager here; inductor in a
slow test). The model under compile: test_model_compile.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from patch_embed_helpers import MIXED_ROWS, make_batch, random_grad
from torch.utils.flop_counter import FlopCounterMode
from varlen_helpers import cu_from_lengths, random_tensor

import patchrec_kernels.reference.varlen_attention as refmod
from patchrec.persrec import block_layout, segmented_attention
from patchrec_kernels.patch_embed import patch_embed, patch_embed_backward_op, patch_embed_op
from patchrec_kernels.reference.varlen_attention import varlen_attention_reference
from patchrec_kernels.runtime import HAS_TRITON, triton_can_run
from patchrec_kernels.varlen_attention import varlen_attention
from patchrec_kernels.varlen_attention_cpu import varlen_attention_cpu_backward_op, varlen_attention_cpu_op
from patchrec_kernels.varlen_ops import varlen_attention_backward_op, varlen_attention_op

PE, PE_BWD = torch.ops.patchrec.patch_embed, torch.ops.patchrec.patch_embed_backward
VA, VA_BWD = torch.ops.patchrec.varlen_attention, torch.ops.patchrec.varlen_attention_backward
VA_CPU, VA_CPU_BWD = torch.ops.patchrec.varlen_attention_cpu, torch.ops.patchrec.varlen_attention_cpu_backward


@pytest.fixture
def triton_device(kernel_device):
    if not HAS_TRITON or not triton_can_run(torch.empty(0, device=kernel_device)):
        pytest.skip("Triton cannot run here")
    return kernel_device


# -------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("deterministic", [True, False])
def test_patch_embed_ops_pass_opcheck(triton_device, deterministic):
    batch = make_batch([[1], [3], [2, 4], [1], [5, 1, 2]], 11, 7, device=triton_device, seed=3)
    weight = batch.weight.requires_grad_()
    torch.library.opcheck(patch_embed_op, (weight, *batch.args[1:], deterministic))
    grad_out = random_grad(batch)
    torch.library.opcheck(patch_embed_backward_op, (grad_out, *batch.args[1:], 11, deterministic))


VARLEN_CASES = {
    # (query lengths, key lengths or None, Hq, Hkv, D, causal, scale, dtype)
    "self-gqa-causal": ([3, 1, 8, 2], None, 4, 2, 8, True, None, torch.float32),
    "keys-blind-rows": ([3, 5, 0, 4], [6, 2, 3, 4], 4, 1, 12, True, 0.3, torch.float64),
    "keys-full": ([2, 7, 1], [5, 1, 4], 2, 2, 8, False, None, torch.float32),
}


def _varlen_inputs(case, seed=0, requires_grad=True):
    len_q, len_k, hq, hkv, d, causal, scale, dtype = VARLEN_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    keys = len_q if len_k is None else len_k
    q = random_tensor(gen, sum(len_q), hq, d, dtype=dtype, requires_grad=requires_grad)
    k, v = (random_tensor(gen, sum(keys), hkv, d, dtype=dtype, requires_grad=requires_grad) for _ in "kv")
    cu_q = cu_from_lengths(len_q)
    cu_k = None if len_k is None else cu_from_lengths(len_k)
    return q, k, v, cu_q, cu_k, max(len_q), max(keys), causal, scale


@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_ops_pass_opcheck(case):
    args = _varlen_inputs(case)
    torch.library.opcheck(varlen_attention_op, args)
    q, k, v, cu_q, cu_k, *rest = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    _, lse = VA(q, k, v, cu_q, cu_k, *rest)
    grad_out = random_tensor(torch.Generator().manual_seed(9), *q.shape, dtype=q.dtype)
    # Inputs without grad: the backward op has no derivative of its own (no double backward).
    torch.library.opcheck(varlen_attention_backward_op, (grad_out, q, k, v, lse, cu_q, cu_k, *rest))


@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_cpu_ops_pass_opcheck(case):
    """The CPU backend's ops (fp32: the backend takes no float64), blind rows and GQA included."""
    floating = lambda a: isinstance(a, torch.Tensor) and a.is_floating_point()
    args = [a.detach().float().requires_grad_() if floating(a) else a for a in _varlen_inputs(case)]
    torch.library.opcheck(varlen_attention_cpu_op, tuple(args))
    q, k, v, cu_q, cu_k, *rest = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = varlen_attention_cpu_op(q, k, v, cu_q, cu_k, *rest)
    grad_out = random_tensor(torch.Generator().manual_seed(9), *q.shape)
    torch.library.opcheck(varlen_attention_cpu_backward_op, (grad_out, q, k, v, out, lse, cu_q, cu_k, *rest))


# ------------------------------------------------------------------------- the reference's backward


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("query_chunk", [None, 3], ids=["whole", "blocks-of-3"])
def test_reference_backward_equals_autograd_of_the_reference(case, query_chunk, monkeypatch):
    """The op's explicit backward (probabilities recomputed from the lse) against autograd through the
    reference's own forward, in fp64; blocks of 3 queries make long sequences share their keys across
    pieces (accumulated gradients) and exercise the bottom-right mask inside a sequence."""
    if query_chunk is not None:
        monkeypatch.setattr(refmod, "QUERY_CHUNK", query_chunk)
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = _varlen_inputs(case, seed=5)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad_out = random_tensor(torch.Generator().manual_seed(6), *q.shape, dtype=torch.float64)
    extra = dict(causal=causal, scale=scale, cu_seqlens_k=cu_k, max_seqlen_k=max_k)
    want = torch.autograd.grad(
        varlen_attention_reference(q, k, v, cu_q, max_q, _query_chunk=query_chunk, **extra),
        (q, k, v),
        grad_out,
    )
    got = torch.autograd.grad(varlen_attention(q, k, v, cu_q, max_q, **extra), (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


# ---------------------------------------------------------------------------------------------- FLOPs


def _visible_pairs(len_q, len_k, causal):
    """(query, key) pairs an attention may score, counted one by one from the bottom-right causal rule."""
    pairs = 0
    for lq, lk in zip(len_q, len_k, strict=True):
        for i in range(lq):
            pairs += sum(1 for j in range(lk) if not causal or j <= i + lk - lq)
    return pairs


def _counts(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_flop_counts()["Global"]


def test_flop_counter_reports_patch_embed_analytic_count(triton_device):
    batch = make_batch(MIXED_ROWS, 19, 33, device=triton_device, seed=7)
    weight = batch.weight.requires_grad_()
    counts = _counts(lambda: patch_embed(weight, *batch.args[1:]).backward(random_grad(batch)))
    tokens = batch.token_ids.numel()
    assert tokens == sum(map(sum, MIXED_ROWS)) == 55
    # One multiply-add per token and column, each way.
    assert counts[PE] == counts[PE_BWD] == 2 * tokens * 33


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_flop_counter_reports_varlen_attention_analytic_count(case, backend):
    len_q, len_k, hq, _, d, causal, _, _ = VARLEN_CASES[case]
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = _varlen_inputs(case)
    if backend == "cpu":  # the CPU backend takes no float64
        q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    pairs = _visible_pairs(len_q, len_q if len_k is None else len_k, causal)
    extra = dict(causal=causal, scale=scale, cu_seqlens_k=cu_k, max_seqlen_k=max_k, backend=backend)
    counts = _counts(lambda: varlen_attention(q, k, v, cu_q, max_q, **extra).sum().backward())
    forward, backward = (VA, VA_BWD) if backend == "reference" else (VA_CPU, VA_CPU_BWD)
    assert set(counts) == {forward, backward}
    # Per head and visible pair: q.k and p.v forward; q.k again, dP, dV, dQ, dK backward; 2 FLOPs each.
    assert counts[forward] == 4 * hq * d * pairs
    assert counts[backward] == 10 * hq * d * pairs


def test_meta_tensors_give_shapes_and_flop_bounds():
    """Meta tensors (a paper-scale shape plan without memory) go through both ops' shape functions; with no
    offsets to read, the attention count is the bound T * (max_seqlen + 1) / 2 of causal self-attention."""
    meta = torch.device("meta")
    weight = torch.empty(128256, 2048, device=meta, requires_grad=True)
    ids, seg, row = (torch.empty(n, dtype=torch.int64, device=meta) for n in (5000, 1201, 901))
    q = torch.empty(900, 32, 64, device=meta, requires_grad=True)
    kv = torch.empty(900, 8, 64, device=meta, requires_grad=True)
    cu = torch.empty(9, dtype=torch.int32, device=meta)

    def step():
        rows = patch_embed(weight, ids, seg, row)
        out = varlen_attention(q, kv, kv, cu, 150)
        assert rows.shape == (900, 2048) and rows.is_meta and out.shape == (900, 32, 64) and out.is_meta
        (rows.sum() + out.sum()).backward()

    counts = _counts(step)
    assert weight.grad.shape == weight.shape and q.grad.shape == q.shape and kv.grad.shape == kv.shape
    assert counts[PE] == counts[PE_BWD] == 2 * 5000 * 2048
    bound = 900 * 151 // 2
    assert counts[VA] == 4 * 32 * 64 * bound and counts[VA_BWD] == 10 * 32 * 64 * bound
    # The bound holds the exact count of any packing it can stand for, e.g. six sequences of 150 rows.
    assert _visible_pairs([150] * 6, [150] * 6, True) <= bound


# -------------------------------------------------------------------------------------- torch.compile


def _packed_batch(rows, seed, vocab=23, dim=16, device="cpu"):
    batch = make_batch(rows, vocab, dim, device=device, seed=seed)
    return batch.args[1:]


def _layer(weight, proj, token_ids, seg_offsets, row_offsets, cu_seqlens, max_seqlen, backend="auto"):
    """patch_embed -> a projection to q/k/v -> varlen_attention: the packed model's two ops in one graph."""
    x = patch_embed(weight, token_ids, seg_offsets, row_offsets, validate=False, backend=backend)
    qkv = (x @ proj).view(x.shape[0], 6, 4)
    return varlen_attention(qkv[:, :4], qkv[:, 4:5], qkv[:, 5:], cu_seqlens, max_seqlen, validate=False)


# Two packed batches of different shapes (rows 9 vs 13, tokens 24 vs 31, sequences 3 vs 4): the second must
# reuse the graph compiled for the first. Sizes avoid the vocabulary (23) and each other, so that no
# coincidence of sizes gets specialised into the graph.
SHAPES = [
    ([[1], [3], [2, 2], [1], [4], [1], [2, 5], [1], [3]], [2, 4, 3]),
    ([[2], [1], [1], [3, 1, 2], [1], [5], [2], [1], [1], [4, 1], [1], [1], [1]], [3, 1, 5, 4]),
]


def _compiled_matches_eager(compiled, eager_fn, inputs_of, params):
    for i, (rows, lengths) in enumerate(SHAPES):
        inputs = inputs_of(rows, lengths, i)
        # The first shape compiles; any other must be served by that graph.
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = compiled(*params, *inputs)
            grads = torch.autograd.grad(out.square().sum(), params)
        want = eager_fn(*params, *inputs)
        want_grads = torch.autograd.grad(want.square().sum(), params)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, want_grads, strict=True):
            assert w.abs().sum() > 0
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _compile_layer(compiler_backend, patch_embed_backend, device="cpu"):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = (
        random_tensor(gen, 23, 16, device=device, requires_grad=True),
        random_tensor(gen, 16, 24, device=device, requires_grad=True),
    )

    def inputs_of(rows, lengths, seed):
        return (*_packed_batch(rows, seed, device=device), cu_from_lengths(lengths, device), max(lengths))

    def layer(*args):
        return _layer(*args, backend=patch_embed_backend)

    # fullgraph: no graph break anywhere in the two public ops; dynamic: sizes and max_seqlen symbolic.
    compiled = torch.compile(layer, backend=compiler_backend, dynamic=True, fullgraph=True)
    _compiled_matches_eager(compiled, layer, inputs_of, params)


@pytest.mark.parametrize("patch_embed_backend", ["triton", "reference"])
def test_compiled_ops_equal_eager_in_one_graph_for_any_packed_shape(triton_device, patch_embed_backend):
    if triton_device.type != "cpu":
        pytest.skip("the CPU run of this test; test_gpu_compiled_ops_equal_eager covers CUDA")
    _compile_layer("aot_eager", patch_embed_backend)


@pytest.mark.slow
def test_inductor_compiles_the_ops(triton_device):
    if triton_device.type != "cpu":
        pytest.skip("the CPU run of this test")
    _compile_layer("inductor", "triton")


def test_segmented_attention_compiles_for_any_layout():
    """PerSRec's attention (varlen_attention with separate key offsets and SymInt max lengths) in one graph,
    forward and backward; a batch with other blocks and longer keys reuses it."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    layouts = [
        block_layout(np.array([3, 4, 2, 5]), np.array([1, 2, 0, 2]), np.array([0, 0, 1, 1]), 2),
        block_layout(np.array([2, 3, 6, 4, 3]), np.array([2, 1, 2, 1, 0]), np.array([0, 0, 0, 1, 2]), 3),
    ]
    assert layouts[0].max_k != layouts[1].max_k and layouts[0].max_q != layouts[1].max_q

    def attend(q, k, v, layout):
        return segmented_attention(q, k, v, layout, scale=0.4)

    compiled = torch.compile(attend, backend="aot_eager", dynamic=True, fullgraph=True)
    for i, layout in enumerate(layouts):
        rows = int(layout.cu_q[-1])
        q, k, v = (random_tensor(gen, rows, h, 8, requires_grad=True) for h in (4, 2, 2))
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = compiled(q, k, v, layout)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        want = attend(q, k, v, layout)
        want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_value_checks_still_raise_under_compile():
    """With validation on, the checks read the offsets (a graph break) and still raise ValueError naming the
    argument before any op runs."""
    torch._dynamo.reset()
    weight = torch.randn(7, 4)
    token_ids, seg_offsets, row_offsets = _packed_batch([[2], [1, 3]], 0, vocab=7, dim=4)
    compiled = torch.compile(patch_embed, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(
        compiled(weight, token_ids, seg_offsets, row_offsets),
        patch_embed(weight, token_ids, seg_offsets, row_offsets),
    )
    with pytest.raises(ValueError, match="^seg_offsets"):
        compiled(weight, token_ids, seg_offsets.flip(0), row_offsets)
    q = torch.randn(6, 2, 4)
    compiled_attention = torch.compile(varlen_attention, backend="aot_eager", dynamic=True)
    with pytest.raises(ValueError, match="max_seqlen"):
        compiled_attention(q, q, q, cu_from_lengths([2, 4]), 3)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_ops_equal_eager(dtype):
    """On CUDA: the Triton op and, in bf16, a fused attention backend (flash-attn's or torch's own ops) in one
    compiled graph, against eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = tuple(
        random_tensor(gen, *shape).to("cuda", dtype).requires_grad_() for shape in ((23, 16), (16, 24))
    )
    compiled = torch.compile(_layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for i, (rows, lengths) in enumerate(SHAPES):
        inputs = (*_packed_batch(rows, i, device="cuda"), cu_from_lengths(lengths, "cuda"), max(lengths))
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = compiled(*params, *inputs)
        want = _layer(*params, *inputs)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    assert math.isfinite(out.float().sum().item())
