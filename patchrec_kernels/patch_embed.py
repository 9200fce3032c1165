"""``patch_embed``: the packed LLM input of a batch as one fused two-level ragged mean of embedding rows.

``out[r] = mean_{s in row r} ( mean_{t in segment s} weight[token_ids[t]] )``. A text token is a row with one
segment of one token, an item patch a row with one segment (the title's tokens), a session patch a row with
several segments (one per item). Every row of every plan is the same op, so there is no padding anywhere.

Layout: Triton kernels, then plain launchers (reused by the benches), then the launchers as ``torch.library``
custom ops (``patchrec::patch_embed`` and its backward, with shape functions and FLOP formulas) and the
autograd.Function over them, then the public op, which alone may fall back to the pure-PyTorch reference.

Both directions use one precomputed per-token fp32 scale ``1 / (segments in its row * tokens in its
segment)``: it turns the mean of means into a single weighted sum, so a program can load a [BLOCK_T, BLOCK_D]
tile of tokens regardless of which segment each token belongs to. It costs 4 bytes per token, against
``2 * D`` bytes per token of embedding traffic.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from patchrec_kernels.patch_embed_checks import check_structure, check_values
from patchrec_kernels.runtime import HAS_TRITON, launch_device, triton_can_run, validation_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - non-Linux installs have no Triton; the public op uses the reference
    triton = None

_BACKENDS = ("auto", "triton", "reference")
# 16 tokens x at most 256 columns keeps a tile at most 4K elements (16 KiB of fp32 accumulators per program
# at 4 warps), large enough to keep many loads in flight per program without spilling registers.
_BLOCK_T = 16
# Column blocks _block_d chooses from, widest first (see there).
_BLOCK_D_CHOICES = (256, 128, 64)


if HAS_TRITON:

    @triton.jit
    def _patch_embed_fwd_kernel(
        weight_ptr,
        token_ids_ptr,
        seg_offsets_ptr,
        row_offsets_ptr,
        token_scale_ptr,
        out_ptr,
        D,
        stride_weight,
        stride_out,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (output row, D-block): the output tile is written exactly once, and the row's
        # tokens are contiguous in token_ids because its segments are, so no per-segment loop is needed.
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        seg_start = tl.load(row_offsets_ptr + row)
        seg_end = tl.load(row_offsets_ptr + row + 1)
        tok_start = tl.load(seg_offsets_ptr + seg_start).to(tl.int64)
        tok_end = tl.load(seg_offsets_ptr + seg_end).to(tl.int64)

        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t0 in range(tok_start, tok_end, BLOCK_T):
            pos = t0 + tl.arange(0, BLOCK_T)
            tok_mask = pos < tok_end
            # int64 before the stride multiply: id * D overflows int32 for large vocabularies and widths.
            ids = tl.load(token_ids_ptr + pos, mask=tok_mask, other=0).to(tl.int64)
            scale = tl.load(token_scale_ptr + pos, mask=tok_mask, other=0.0)
            tile = tl.load(
                weight_ptr + ids[:, None] * stride_weight + cols[None, :],
                mask=tok_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(tile * scale[:, None], axis=0)
        tl.store(
            out_ptr + row.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask
        )

    @triton.jit
    def _patch_embed_bwd_sorted_kernel(
        grad_out_ptr,
        sorted_pos_ptr,
        id_offsets_ptr,
        token_row_ptr,
        token_scale_ptr,
        grad_weight_ptr,
        D,
        stride_grad_out,
        stride_grad_weight,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (vocabulary row, D-block). Its tokens are a contiguous run of the stably sorted
        # positions, summed in a fixed order: no atomics, bitwise reproducible. Ids that never occur have an
        # empty run and write zeros, so grad_weight needs no memset beforehand.
        vid = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        run_start = tl.load(id_offsets_ptr + vid)
        run_end = tl.load(id_offsets_ptr + vid + 1)

        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for p0 in range(run_start, run_end, BLOCK_T):
            p = p0 + tl.arange(0, BLOCK_T)
            mask = p < run_end
            pos = tl.load(sorted_pos_ptr + p, mask=mask, other=0)
            rows = tl.load(token_row_ptr + pos, mask=mask, other=0).to(tl.int64)
            scale = tl.load(token_scale_ptr + pos, mask=mask, other=0.0)
            tile = tl.load(
                grad_out_ptr + rows[:, None] * stride_grad_out + cols[None, :],
                mask=mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(tile * scale[:, None], axis=0)
        tl.store(
            grad_weight_ptr + vid.to(tl.int64) * stride_grad_weight + cols,
            acc.to(grad_weight_ptr.dtype.element_ty),
            mask=col_mask,
        )

    @triton.jit
    def _patch_embed_bwd_atomic_kernel(
        grad_out_ptr,
        token_ids_ptr,
        seg_offsets_ptr,
        row_offsets_ptr,
        token_scale_ptr,
        grad_acc_ptr,
        D,
        stride_grad_out,
        stride_grad_acc,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Mirror of the forward: the row's grad_out tile is read once and scattered to each of its tokens.
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        seg_start = tl.load(row_offsets_ptr + row)
        seg_end = tl.load(row_offsets_ptr + row + 1)
        tok_start = tl.load(seg_offsets_ptr + seg_start).to(tl.int64)
        tok_end = tl.load(seg_offsets_ptr + seg_end).to(tl.int64)
        grad = tl.load(grad_out_ptr + row.to(tl.int64) * stride_grad_out + cols, mask=col_mask, other=0.0).to(
            tl.float32
        )

        for t0 in range(tok_start, tok_end, BLOCK_T):
            pos = t0 + tl.arange(0, BLOCK_T)
            tok_mask = pos < tok_end
            ids = tl.load(token_ids_ptr + pos, mask=tok_mask, other=0).to(tl.int64)
            scale = tl.load(token_scale_ptr + pos, mask=tok_mask, other=0.0)
            # Ordering between programs does not matter for a sum, so relaxed atomics are enough.
            tl.atomic_add(
                grad_acc_ptr + ids[:, None] * stride_grad_acc + cols[None, :],
                grad[None, :] * scale[:, None],
                mask=tok_mask[:, None] & col_mask[None, :],
                sem="relaxed",
            )


def _block_d(dim: int) -> int:
    """Columns per program: the widest block that pads D the least.

    A masked lane costs an issue slot and a register for nothing: one 256 block per 256 columns would run
    D = 576 (SmolLM2-135M) as 768 lanes, 25% masked, where nine 64-wide blocks mask none. Narrower blocks
    also use fewer registers (the compile report: 40 instead of 56 per thread for the bf16 forward on sm_80)
    at the price of more programs, each re-reading its row's ids, so ties go to the widest. Each column's
    sum runs over the same tokens in the same order whatever the block, so results do not change.
    """
    if dim <= _BLOCK_D_CHOICES[-1]:
        return triton.next_power_of_2(max(dim, 1))
    return min(_BLOCK_D_CHOICES, key=lambda block: (triton.cdiv(dim, block) * block, -block))


def _out_buffer(out, shape, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    # The kernels write with unit column stride and the row stride they are given; anything else would
    # leave elements unwritten or write outside the buffer.
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)}")
    return out


def _segments_of(seg_offsets: torch.Tensor, row_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per segment [S] and segments per row [R], both int64."""
    return seg_offsets.diff().long(), row_offsets.diff().long()


def token_scale(seg_offsets: torch.Tensor, row_offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-token fp32 weight ``1 / (segments in its row * tokens in its segment)``, shape [T].

    ``output_size`` is passed to every repeat_interleave so that nothing here synchronises with the GPU.
    """
    tokens_per_segment, segments_per_row = _segments_of(seg_offsets, row_offsets)
    num_segments = tokens_per_segment.numel()
    segments_in_row = torch.repeat_interleave(segments_per_row, segments_per_row, output_size=num_segments)
    # The integer product is exact; only the reciprocal rounds (once), which keeps fp32 within an ulp or two
    # of dividing twice as the reference does.
    segment_scale = 1.0 / (tokens_per_segment * segments_in_row).to(torch.float32)
    return torch.repeat_interleave(segment_scale, tokens_per_segment, output_size=num_tokens)


def _token_row(seg_offsets: torch.Tensor, row_offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Output row of every token, int32 [T] (R < 2^31 always holds for a batch)."""
    num_rows = row_offsets.numel() - 1
    tokens_per_row = (seg_offsets[row_offsets[1:]] - seg_offsets[row_offsets[:-1]]).long()
    rows = torch.arange(num_rows, device=row_offsets.device, dtype=torch.int32)
    return torch.repeat_interleave(rows, tokens_per_row, output_size=num_tokens)


def patch_embed_fwd(
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused forward. No validation: call ``patch_embed`` unless the inputs are known good.

    ``out`` ([R, D], weight's dtype, contiguous) lets benches reuse a buffer and tests poison it; ``scale``
    is a precomputed ``token_scale`` (the autograd.Function shares it with the backward).
    """
    num_rows, dim = row_offsets.numel() - 1, weight.shape[1]
    out = _out_buffer(out, (num_rows, dim), weight)
    if num_rows == 0 or dim == 0:
        return out
    # Index tensors are addressed as dense 1-D arrays; sliced views get copied (a no-op otherwise).
    token_ids, seg_offsets, row_offsets = (t.contiguous() for t in (token_ids, seg_offsets, row_offsets))
    if scale is None:
        scale = token_scale(seg_offsets, row_offsets, token_ids.numel())
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    block_d = _block_d(dim)
    grid = (num_rows, triton.cdiv(dim, block_d))
    with launch_device(weight):
        _patch_embed_fwd_kernel[grid](
            weight, token_ids, seg_offsets, row_offsets, scale, out,
            dim, weight.stride(0), out.stride(0),
            BLOCK_T=_BLOCK_T, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def patch_embed_bwd(
    grad_out: torch.Tensor,
    token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    num_embeddings: int,
    *,
    deterministic: bool = True,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense gradient of the table, [V, D] in grad_out's dtype, accumulated in fp32.

    ``deterministic=True`` (default) stable-sorts token positions by id and lets one program per id and
    D-block sum its tokens in a fixed order: bitwise-reproducible runs and exact resume, and no atomic
    contention on very frequent ids (separators, common title words); it costs one sort of T ints.
    ``deterministic=False`` scatters with fp32 atomics into a zeroed [V, D] buffer, then casts: no sort, but
    summation order and so the low bits vary from run to run.

    ``out`` ([V, D], contiguous) is written in full (untouched rows get zeros); ``scale`` as in the forward.
    """
    num_tokens, dim = token_ids.numel(), grad_out.shape[1]
    shape, device, dtype = (num_embeddings, dim), grad_out.device, grad_out.dtype
    if out is not None:
        out = _out_buffer(out, shape, grad_out)
    if num_tokens == 0 or dim == 0 or num_embeddings == 0:
        return torch.zeros(shape, device=device, dtype=dtype) if out is None else out.zero_()
    token_ids, seg_offsets, row_offsets = (t.contiguous() for t in (token_ids, seg_offsets, row_offsets))
    if scale is None:
        scale = token_scale(seg_offsets, row_offsets, num_tokens)
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    block_d = _block_d(dim)
    if deterministic:
        out = _out_buffer(out, shape, grad_out)
        sorted_ids, sorted_pos = torch.sort(token_ids, stable=True)
        # Run boundaries of each id in the sorted order, found without a device sync (unlike torch.unique).
        vocab = torch.arange(num_embeddings + 1, device=device, dtype=token_ids.dtype)
        id_offsets = torch.searchsorted(sorted_ids, vocab)
        token_row = _token_row(seg_offsets, row_offsets, num_tokens)
        grid = (num_embeddings, triton.cdiv(dim, block_d))
        with launch_device(grad_out):
            _patch_embed_bwd_sorted_kernel[grid](
                grad_out, sorted_pos, id_offsets, token_row, scale, out,
                dim, grad_out.stride(0), out.stride(0),
                BLOCK_T=_BLOCK_T, BLOCK_D=block_d,
            )  # fmt: skip
        return out
    # fp32 accumulation buffer even for bf16 tables: bf16 atomics would round after every addition.
    grad_acc = torch.zeros(shape, device=device, dtype=torch.float32)
    grid = (row_offsets.numel() - 1, triton.cdiv(dim, block_d))
    with launch_device(grad_out):
        _patch_embed_bwd_atomic_kernel[grid](
            grad_out, token_ids, seg_offsets, row_offsets, scale, grad_acc,
            dim, grad_out.stride(0), grad_acc.stride(0),
            BLOCK_T=_BLOCK_T, BLOCK_D=block_d,
        )  # fmt: skip
    if out is None:
        return grad_acc if dtype == torch.float32 else grad_acc.to(dtype)
    return out.copy_(grad_acc)


# ------------------------------------------------------------------------------ torch.library ops
#
# The Triton launchers as custom ops, so that torch.compile (and FakeTensor / meta tracing, FlopCounterMode)
# sees one opaque op with a shape function instead of tracing into Triton's launcher or its CPU interpreter.
# Index tensors are data, not shapes: nothing here depends on their values at trace time, so a new packed
# batch (other T, S, R) reuses a graph compiled with dynamic shapes.


@torch.library.custom_op("patchrec::patch_embed", mutates_args=())
def patch_embed_op(
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    deterministic: bool,
) -> torch.Tensor:
    """``patchrec::patch_embed``: the fused forward (Triton; CUDA, or CPU under ``TRITON_INTERPRET=1``).

    No checks: ``patch_embed`` checks first. ``deterministic`` only selects the backward's mode; it is an
    argument so that the op's autograd can read it.
    """
    return patch_embed_fwd(weight, token_ids, seg_offsets, row_offsets)


@patch_embed_op.register_fake
def _patch_embed_fake(weight, token_ids, seg_offsets, row_offsets, deterministic):
    return weight.new_empty((row_offsets.shape[0] - 1, weight.shape[1]))


@torch.library.custom_op("patchrec::patch_embed_backward", mutates_args=())
def patch_embed_backward_op(
    grad_out: torch.Tensor,
    token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    num_embeddings: int,
    deterministic: bool,
) -> torch.Tensor:
    """``patch_embed_bwd`` as ``patchrec::patch_embed_backward``: the dense [V, D] gradient of the table."""
    return patch_embed_bwd(
        grad_out, token_ids, seg_offsets, row_offsets, num_embeddings, deterministic=deterministic
    )


@patch_embed_backward_op.register_fake
def _patch_embed_backward_fake(grad_out, token_ids, seg_offsets, row_offsets, num_embeddings, deterministic):
    return grad_out.new_empty((num_embeddings, grad_out.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    weight, token_ids, seg_offsets, row_offsets, deterministic = inputs
    ctx.save_for_backward(token_ids, seg_offsets, row_offsets)
    ctx.num_embeddings = weight.shape[0]  # a SymInt under dynamic shapes
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    grad_weight = patch_embed_backward_op(grad_out, *ctx.saved_tensors, ctx.num_embeddings, ctx.deterministic)
    return grad_weight, None, None, None, None


patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.patchrec.patch_embed)
def _patch_embed_flop(weight_shape, token_ids_shape, *args, out_shape=None, **kwargs) -> int:
    # One multiply (by the token's 1 / (segments * tokens) weight) and one add per token and column.
    return 2 * token_ids_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.patchrec.patch_embed_backward)
def _patch_embed_backward_flop(grad_out_shape, token_ids_shape, *args, out_shape=None, **kwargs) -> int:
    # The mirror image: each token adds its row's scaled gradient to its embedding row.
    return 2 * token_ids_shape[0] * grad_out_shape[1]


class PatchEmbedFunction(torch.autograd.Function):
    """The public op's autograd node on the Triton path: ``patchrec::patch_embed`` forward, the
    ``patchrec::patch_embed_backward`` op backward (the op's own autograd registration does the same for
    direct callers of ``torch.ops.patchrec.patch_embed``). Gradients flow to ``weight`` only."""

    @staticmethod
    def forward(weight, token_ids, seg_offsets, row_offsets, deterministic=True):
        return patch_embed_op(weight, token_ids, seg_offsets, row_offsets, deterministic)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def patch_embed(
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    *,
    deterministic: bool = True,
    validate: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Packed input embeddings: each output row is a mean of means of rows of ``weight``.

    ``out[r] = mean over segments s of row r of (mean over tokens t of segment s of weight[token_ids[t]])``,
    segments of row r = ``row_offsets[r] .. row_offsets[r+1]-1``, tokens of segment s =
    ``seg_offsets[s] .. seg_offsets[s+1]-1``.

    Args:
        weight: [V, D] float32/bfloat16/float16 embedding table; the only input that receives a gradient.
        token_ids: [T] int32/int64 ids in [0, V).
        seg_offsets: [S + 1] int32/int64, strictly increasing from 0 to T (every segment has >= 1 token).
        row_offsets: [R + 1] int32/int64, strictly increasing from 0 to S (every row has >= 1 segment).
            R = 0 is allowed (``row_offsets = seg_offsets = [0]``, T = 0) and gives an empty [0, D] output.
        deterministic: backward mode of the Triton path. True (default): sort-based, no float atomics, so the
            gradient is bitwise reproducible (reproducible training, exact resume) and frequent ids do not
            contend on atomics; costs one sort of T ints. False: fp32 atomics, run-to-run low-bit noise.
            The reference path is differentiated by autograd and ignores this.
        validate: run the value checks on the index tensors (offsets start at 0, end at the length they
            index, strictly increase; ids in range). They read device memory, i.e. synchronise once with the
            GPU. None (default) means on unless the environment sets ``PATCHREC_KERNELS_VALIDATE=0``;
            ``validate=False`` skips them for this call. With them off, invalid indices are undefined
            behaviour (out-of-range ids read out of bounds). Shape, dtype and device checks always run.
        backend: "auto" (Triton when it can run on ``weight``'s device: CUDA, or CPU under
            ``TRITON_INTERPRET=1``; else the reference), "triton" (ValueError if it cannot run), "reference".
            The Triton path is the ``patchrec::patch_embed`` custom op (torch.compile, FakeTensor and meta
            tracing, FlopCounterMode see it as one op); meta tensors take it too, for shapes and FLOPs. The
            reference is plain PyTorch that compile traces.

    Returns:
        [R, D] in ``weight``'s dtype, accumulated in fp32.

    Raises:
        ValueError: naming the offending argument.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    check_structure(weight, token_ids, seg_offsets, row_offsets)
    # Meta tensors (shape tracing, FLOP counting) have no values to check and take the op's shape function.
    if validation_enabled(validate) and not weight.is_meta:
        check_values(weight, token_ids, seg_offsets, row_offsets)
    can_run = triton_can_run(weight) or weight.is_meta
    if backend == "triton" and not can_run:
        raise ValueError(
            f"backend='triton' cannot run on a {weight.device.type} tensor here (Triton needs CUDA, or "
            "TRITON_INTERPRET=1 set before import for CPU tensors); use backend='auto' or 'reference'"
        )
    if backend == "reference" or not can_run:
        from patchrec_kernels.reference.patch_embed import patch_embed_reference

        # Plain PyTorch with static output sizes: torch.compile traces it like any other code.
        return patch_embed_reference(weight, token_ids, seg_offsets, row_offsets)
    return PatchEmbedFunction.apply(weight, token_ids, seg_offsets, row_offsets, deterministic)
