"""Attention over packed variable-length sequences (no padding), with three interchangeable backends.

Backends, in the order ``backend="auto"`` tries them:
- ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` (optional extra; CUDA sm80+, fp16/bf16,
  head_dim <= 256).
- ``"torch"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA sm80+, fp16/bf16, head_dim <= 256), when the
  installed torch has it; with ``return_lse`` only when that torch can return the log-sum-exp.
- ``"cpu"``: torch's fused CPU flash-attention kernel over groups of equal-length sequences
  (``patchrec_kernels.varlen_attention_cpu``; CPU tensors, fp32/bf16/fp16): the fast path on a CPU.
- ``"reference"``: ``patchrec_kernels.reference.varlen_attention`` (any device, any float dtype), run as
  the ``patchrec::varlen_attention`` custom op (``patchrec_kernels.varlen_ops``): the ground truth every
  other backend is tested against, and what float64 (gradient checks) and meta tensors (shape tracing) get.

All backends share one contract (see ``varlen_attention``): bottom-right causal alignment, the same GQA
head mapping, and the same token-major lse layout, so that partial results from different backends can be
merged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math

import torch
import torch.nn.functional as F

from patchrec_kernels import runtime
from patchrec_kernels.runtime import validation_enabled
from patchrec_kernels.varlen_attention_cpu import DTYPES as CPU_DTYPES
from patchrec_kernels.varlen_attention_cpu import varlen_attention_cpu_op
from patchrec_kernels.varlen_ops import varlen_attention_op

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch", "cpu", "reference")

# Flash kernels (both the flash-attn package and torch's vendored copy) only handle these.
_FUSED_DTYPES = (torch.float16, torch.bfloat16)
_FUSED_MAX_HEAD_DIM = 256
_FUSED_MIN_CAPABILITY = (8, 0)
# Both flash kernels take a fast path when the longest query is 1 with GQA (and no window): q is reshaped
# by the batch size, which fails as soon as one query sequence is empty (Dao-AILab/flash-attention #1537,
# #1619), e.g. a beam-search step where every beam of a sample has finished. max_seqlen is an upper bound,
# so passing at least 2 avoids that path and changes nothing else.
_FUSED_MIN_MAX_SEQLEN_Q = 2


@functools.lru_cache(maxsize=1)
def _torch_varlen_params() -> frozenset[str] | None:
    """Keyword names of the installed ``varlen_attn``, or None when this torch has none.

    Its signature moved between releases (2.10 took ``is_causal``; 2.13 takes ``window_size``,
    ``enable_gqa`` and ``return_aux``), so the backend adapts to what is there instead of pinning torch.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


# The probes below read the installation and the device, never tensor data. torch.compile takes their
# answers as constants of the graph (assume_constant_result) rather than tracing into importlib, inspect or
# the CUDA runtime; the lru_caches stay underneath so that every eager call pays for each probe once.


@torch.compiler.assume_constant_result
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@torch.compiler.assume_constant_result
def _flash_attn_problem() -> str | None:
    return runtime.flash_attn_problem()


@torch.compiler.assume_constant_result
def _torch_varlen_problem(return_lse: bool) -> str | None:
    params = _torch_varlen_params()
    if params is None:
        return "this torch has no torch.nn.attention.varlen.varlen_attn"
    if "window_size" not in params and "is_causal" not in params:
        return "this torch's varlen_attn takes neither window_size nor is_causal"
    if return_lse and "return_aux" not in params:
        return "this torch's varlen_attn cannot return the log-sum-exp (no return_aux)"
    return None


@torch.compiler.assume_constant_result
def _torch_varlen_takes(name: str) -> bool:
    return name in _torch_varlen_params()


def _cuda_problem(q: torch.Tensor) -> str | None:
    """Why a flash kernel cannot take ``q``'s device, or None. Split out so tests can fake a GPU."""
    if not q.is_cuda:
        return f"needs a CUDA tensor, got device {q.device}"
    if _compute_capability(q.device) < _FUSED_MIN_CAPABILITY:
        return f"needs compute capability >= {_FUSED_MIN_CAPABILITY}"
    return None


def _cpu_problem(q: torch.Tensor) -> str | None:
    """Why the CPU kernel cannot take ``q``, or None. Split out so tests can fake a GPU."""
    if q.device.type != "cpu":
        return f"needs a CPU tensor, got device {q.device}"
    if q.dtype not in CPU_DTYPES:
        return f"needs fp32/bf16/fp16, got {q.dtype} (float64 runs on the reference)"
    return None


def _fused_problem(q: torch.Tensor) -> str | None:
    if q.dtype not in _FUSED_DTYPES:
        return f"needs fp16/bf16, got {q.dtype}"
    if q.shape[-1] > _FUSED_MAX_HEAD_DIM:
        return f"needs head_dim <= {_FUSED_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return _cuda_problem(q)


def _backend_problem(name: str, q: torch.Tensor, return_lse: bool) -> str | None:
    """Why backend ``name`` cannot run this call, or None when it can.

    The tensor's own limits (dtype, head_dim, device) come first: they cost nothing, and on a CPU tensor
    they settle the answer before any package is probed.
    """
    if name == "reference":
        return None
    if name == "cpu":
        return _cpu_problem(q)
    problem = _fused_problem(q)
    if problem is not None:
        return problem
    if name == "flash_attn":
        return _flash_attn_problem()
    return _torch_varlen_problem(return_lse)


def _log_choice(message: str, *args) -> None:
    # Logging inside a compiled region is a graph break (dynamo does not trace it): eager calls log only.
    if not torch.compiler.is_compiling():
        logger.debug(message, *args)


def resolve_varlen_backend(q: torch.Tensor, *, backend: str = "auto", return_lse: bool = False) -> str:
    """The backend ``varlen_attention`` uses for query tensor ``q``: "flash_attn", "torch", "cpu" or
    "reference".

    ``backend="auto"`` takes the first that can run (flash_attn, torch, cpu, reference). An explicit name that
    cannot run here raises ``ValueError`` with the reason, rather than silently falling back.
    """
    if backend == "auto":
        for name in BACKENDS:
            problem = _backend_problem(name, q, return_lse)
            if problem is None:
                _log_choice("varlen_attention: backend=%s (auto)", name)
                return name
            _log_choice("varlen_attention: skipping %s: %s", name, problem)
        raise AssertionError("unreachable: the reference backend always runs")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    problem = _backend_problem(backend, q, return_lse)
    if problem is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {problem}")
    _log_choice("varlen_attention: backend=%s (requested)", backend)
    return backend


# ---------------------------------------------------------------------------------------------- checks


def _check_offsets(name: str, offsets: torch.Tensor, device: torch.device) -> None:
    if not isinstance(offsets, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(offsets).__name__}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {offsets.dtype}")
    if offsets.ndim != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with B+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    if offsets.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {offsets.device}")


def _check_offset_values(name: str, offsets: torch.Tensor, total: int, max_name: str, max_len: int) -> None:
    """Value checks that read the offsets (a device sync), run only when validation is on."""
    values = offsets.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {values[-1]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if any(length < 0 for length in lengths):
        raise ValueError(f"{name} must be non-decreasing")
    longest = max(lengths, default=0)
    if max_len < longest:
        raise ValueError(f"{max_name}={max_len} is smaller than the longest sequence in {name} ({longest})")


def _check_max(name: str, value: object) -> int:
    # torch.compile with dynamic shapes hands a python int in as a SymInt.
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, validate) -> int:
    """Shape/dtype/device checks (free) and, when validation is on, value checks. Returns max_seqlen_k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k must have q's head_dim {q.shape[2]}, got {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k's head count {k.shape[1]} must divide q's {q.shape[1]} (GQA)")
    max_seqlen = _check_max("max_seqlen", max_seqlen)
    _check_offsets("cu_seqlens", cu_seqlens, q.device)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"k must have q's {q.shape[0]} tokens when cu_seqlens_k is None, got {k.shape[0]}"
            )
        if max_seqlen_k is not None and max_seqlen_k != max_seqlen:
            raise ValueError("max_seqlen_k may only differ from max_seqlen when cu_seqlens_k is given")
        max_seqlen_k = max_seqlen
    else:
        _check_offsets("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(
                f"cu_seqlens_k must describe as many sequences as cu_seqlens ({cu_seqlens.numel() - 1}), "
                f"got {cu_seqlens_k.numel() - 1}"
            )
        if max_seqlen_k is None:  # convenient but syncs: pass it on a hot path
            lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            max_seqlen_k = int(lengths_k.max().item()) if lengths_k.numel() else 0
        max_seqlen_k = _check_max("max_seqlen_k", max_seqlen_k)
    # Meta tensors (shape tracing, FLOP counting) have no values to check.
    if validation_enabled(validate) and not q.is_meta:
        _check_offset_values("cu_seqlens", cu_seqlens, q.shape[0], "max_seqlen", max_seqlen)
        if cu_seqlens_k is not None:
            _check_offset_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    return max_seqlen_k


# -------------------------------------------------------------------------------------- fused backends


def _lse_token_major(
    lse: torch.Tensor, cu_seqlens: torch.Tensor, total_q: int, num_heads: int
) -> torch.Tensor:
    """Bring a kernel's lse to the public layout [T, Hq] float32, with -inf for query rows with no key.

    Varlen flash kernels return [Hq, T] (flash-attn >= 2.4 and torch's vendored copy; the [H, T] layout is
    also what torch's meta function declares). flash-attn < 2.4 returned a padded [B, Hq, max_seqlen_q];
    that is unpacked on the device without a sync. [T, Hq] (as torch's varlen docstring claims) is taken
    as is. When T == Hq the shape is ambiguous and [Hq, T] (the kernels' real layout) wins.
    """
    if lse.ndim == 2 and lse.shape == (num_heads, total_q):
        lse = lse.transpose(0, 1)
    elif lse.ndim == 3 and lse.shape[:2] == (cu_seqlens.numel() - 1, num_heads):
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        seq = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lse.device), lengths, output_size=total_q
        )
        pos = torch.arange(total_q, device=lse.device) - starts[seq]
        lse = lse[seq, :, pos]
    elif lse.shape != (total_q, num_heads):
        raise RuntimeError(f"unexpected lse shape {tuple(lse.shape)} from the attention kernel")
    lse = lse.float()
    # Flash kernels mark an empty row with +inf; the public contract is -inf (log of an empty sum).
    return lse.masked_fill(lse == math.inf, -math.inf).contiguous()


def _flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, deterministic):
    from flash_attn import flash_attn_varlen_func

    out, lse, *_ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k,
        dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True,
        deterministic=deterministic,
    )  # fmt: skip
    return out, lse


@functools.lru_cache(maxsize=1)
def _warn_torch_backward_not_deterministic() -> None:
    logger.warning(
        "varlen_attention(deterministic=True) on the torch backend: torch's flash backward is deterministic "
        "only under torch.use_deterministic_algorithms(True); gradients may differ in their low bits"
    )


@torch.compiler.assume_constant_result
def _note_torch_backward_not_deterministic() -> bool:
    # Warns (once) when called; torch.compile calls it once while tracing instead of tracing logging.
    _warn_torch_backward_not_deterministic()
    return True


def _torch_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, want_lse, deterministic):
    from torch.nn.attention import varlen as torch_varlen

    # torch's varlen_attn has no per-call switch: its backward reads the global deterministic flag.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if deterministic and needs_grad and not torch.are_deterministic_algorithms_enabled():
        _note_torch_backward_not_deterministic()
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    kwargs = {}
    if _torch_varlen_takes("window_size"):
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)  # compared as a tuple inside torch
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if _torch_varlen_takes("enable_gqa"):
            kwargs["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its kv head (same h // G mapping)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # torch's vendored flash kernel asserts head_dim % 8 == 0 (SDPA pads before calling it; so do we).
    # Zero columns change neither the scores (the scale is pinned below) nor the kept output columns.
    pad = -head_dim % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    if _torch_varlen_takes("scale"):
        kwargs["scale"] = scale
    else:  # fold the scale into q so the kernel's default 1/sqrt(padded D) lands on it
        q = q * (scale * math.sqrt(head_dim + pad))
    lse = None
    if want_lse:
        kwargs["return_aux"] = torch_varlen.AuxRequest(lse=True)
        out, lse = torch_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    else:
        out = torch_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    if pad:
        out = out[..., :head_dim]
    return out, lse


# ---------------------------------------------------------------------------------------------- public


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention within each of B packed sequences; no token ever attends across sequences.

    Args:
        q: [T, Hq, D] queries, sequences back to back.
        k, v: [Tk, Hkv, D] keys/values, same dtype and device as q; Hq % Hkv == 0 (GQA: query head h
            reads kv head h // (Hq // Hkv)). Tk == T when ``cu_seqlens_k`` is None.
        cu_seqlens: [B+1] int32/int64 offsets of the query sequences (0, ..., T), on q's device.
        max_seqlen: the longest query sequence (an upper bound is fine; a smaller value is an error).
        causal: causal masking, bottom-right aligned as in flash-attn >= 2.1: query i of a sequence with
            Lq queries and Lk keys sees keys j <= i + Lk - Lq (the usual lower triangle when Lq == Lk).
            False means full attention within each (query sequence, key sequence) pair.
        scale: score scale; default 1 / sqrt(D).
        cu_seqlens_k: [B+1] offsets of the key sequences (0, ..., Tk) when queries attend to a different
            packing of keys (e.g. continuations to a cached prompt); default: the keys are packed like q.
        max_seqlen_k: the longest key sequence; computed from ``cu_seqlens_k`` (a device sync) when omitted.
        return_lse: also return the log-sum-exp.
        deterministic: a bitwise-reproducible backward. flash-attn gets ``deterministic=True`` (its default
            backward accumulates dq with atomics); torch's varlen backward follows
            ``torch.use_deterministic_algorithms`` instead (a warning says so when that is off); the
            reference is deterministic anyway, and the cpu backend gives bitwise-equal gradients run after
            run (tested).
        backend: "auto", "flash_attn", "torch", "cpu" or "reference" (see ``resolve_varlen_backend``).
        validate: run the value checks that read the offsets (a device sync); None follows
            ``PATCHREC_KERNELS_VALIDATE`` (on by default).

    Returns:
        out [T, Hq, D] in q's dtype; with ``return_lse`` also lse [T, Hq] float32, token-major like
        ``out`` on every backend: lse[t, h] = log(sum over visible keys j of exp(scale * q[t, h] . k[j])),
        natural log. A query row that sees no key (only possible with ``cu_seqlens_k``, bottom-right causal
        and Lq > Lk, or an empty key sequence) has out 0 and lse -inf. Two partial results over disjoint
        key sets merge exactly as ``lse = logaddexp(lse1, lse2)``, ``out = exp(lse1 - lse) * out1 +
        exp(lse2 - lse) * out2``.

    Autograd flows to q, k and v on every backend. lse is returned detached on every backend: the fused
    kernels do not differentiate it, and a gradient that existed on CPU only would make training depend on
    the machine.
    """
    max_seqlen_k = _check_inputs(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, validate)
    name = resolve_varlen_backend(q, backend=backend, return_lse=return_lse)
    if name == "reference" or q.shape[0] == 0:
        # patchrec::varlen_attention: the reference as one op that torch.compile does not trace into.
        out, lse = varlen_attention_op(
            q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale
        )
        return (out, lse.detach().float()) if return_lse else out
    if name == "cpu":
        out, lse = varlen_attention_cpu_op(
            q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale
        )
        return (out, lse.detach()) if return_lse else out
    return _fused_attention(name, q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, scale,
                            return_lse, deterministic)  # fmt: skip


def _fused_attention(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_k: int, causal: bool, scale: float | None, return_lse: bool,
    deterministic: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``varlen_attention`` on a fused backend (``name``: flash_attn or torch), inputs checked."""
    # Both flash kernels read dense int32 offsets: a strided int32 view would be passed through unchanged.
    cu_q = cu_seqlens.to(torch.int32).contiguous()
    cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.to(torch.int32).contiguous()
    max_q = max(max_seqlen, _FUSED_MIN_MAX_SEQLEN_Q)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # Rows with no visible key only exist with a separate key packing; only then is the lse needed to find
    # and zero them, so the plain self-attention path stays as cheap as the kernel.
    need_lse = return_lse or cu_seqlens_k is not None
    if name == "flash_attn":
        out, lse = _flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_seqlen_k, causal, scale, deterministic)
    else:
        # An older torch without return_aux only gets here without return_lse (see _backend_problem); it
        # then relies on the kernel's own zero output for rows with no key.
        need_lse = need_lse and _torch_varlen_takes("return_aux")
        out, lse = _torch_varlen_forward(
            q, k, v, cu_q, cu_k, max_q, max_seqlen_k, causal, scale, need_lse, deterministic
        )
    if not need_lse:
        return out
    lse = _lse_token_major(lse.detach(), cu_q, q.shape[0], q.shape[1])
    if cu_seqlens_k is not None:
        out = out.masked_fill(torch.isneginf(lse)[..., None], 0.0)
    return (out, lse) if return_lse else out
