"""varlen_attention backends: resolution order, explicit overrides, the fused backends' glue on CPU through
fakes that compute with the reference (the real kernels on a GPU: test_varlen_attention_gpu.py)."""

from __future__ import annotations

import importlib
import logging
import math
import sys
import types

import pytest
import torch
from varlen_helpers import cu_from_lengths, random_tensor

from patchrec_kernels import runtime
from patchrec_kernels.reference.varlen_attention import varlen_attention_reference
from patchrec_kernels.varlen_attention import resolve_varlen_backend, varlen_attention

# The package re-exports the op under the module's name, so fetch the module itself.
vmod = importlib.import_module("patchrec_kernels.varlen_attention")


# ---------------------------------------------------------------------------------- backend resolution

TORCH_2_13_PARAMS = frozenset({"return_aux", "scale", "window_size", "enable_gqa"})
TORCH_OLD_PARAMS = frozenset({"return_aux", "is_causal"})  # 2.10-style: no window, no gqa, no scale


def test_cpu_resolution(caplog):
    """On a CPU: torch's fused CPU kernel for fp32 / bf16 / fp16, the reference for float64 and meta."""
    q = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger=vmod.__name__):
        assert resolve_varlen_backend(q) == "cpu"
    assert "backend=cpu" in caplog.text
    assert resolve_varlen_backend(q.float()) == resolve_varlen_backend(q.half()) == "cpu"
    assert resolve_varlen_backend(q.double()) == "reference"
    assert resolve_varlen_backend(q.to("meta")) == "reference"
    with pytest.raises(ValueError, match="float64 runs on the reference"):
        resolve_varlen_backend(q.double(), backend="cpu")
    with pytest.raises(ValueError, match="needs a CPU tensor"):
        resolve_varlen_backend(q.to("meta"), backend="cpu")
    for name in ("flash_attn", "torch"):
        with pytest.raises(ValueError, match=name):
            resolve_varlen_backend(q, backend=name)
        with pytest.raises(ValueError, match="cannot run here"):
            varlen_attention(q, q, q, cu_from_lengths([4]), 4, backend=name)


def test_installed_torch_varlen_signature():
    """The torch backend's assumptions about the installed torch (2.13): the 2.13-style keywords exist."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13):
        pytest.skip("older torch: the backend adapts to its signature instead")
    params = vmod._torch_varlen_params()
    assert params is not None and TORCH_2_13_PARAMS <= params


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend tensors sit on an sm80+ GPU so that the availability logic can be exercised on CPU."""
    monkeypatch.setattr(vmod, "_cuda_problem", lambda q: None)
    monkeypatch.setattr(vmod, "_cpu_problem", lambda q: "needs a CPU tensor, got device cuda:0")
    return monkeypatch


@pytest.mark.parametrize(
    "flash, torch_params, dtype, head_dim, return_lse, expected",
    [
        (True, TORCH_2_13_PARAMS, torch.float16, 64, True, "flash_attn"),
        (False, TORCH_2_13_PARAMS, torch.bfloat16, 64, True, "torch"),
        (False, None, torch.bfloat16, 64, False, "reference"),
        (True, TORCH_2_13_PARAMS, torch.float32, 64, False, "reference"),
        (True, TORCH_2_13_PARAMS, torch.float16, 320, False, "reference"),
        (False, frozenset({"is_causal"}), torch.float16, 64, True, "reference"),  # no lse there
        (False, frozenset({"is_causal"}), torch.float16, 64, False, "torch"),
    ],
)
def test_auto_resolution_order(fake_gpu, flash, torch_params, dtype, head_dim, return_lse, expected):
    fake_gpu.setattr(runtime, "flash_attn_problem", lambda: None if flash else "not installed")
    fake_gpu.setattr(vmod, "_torch_varlen_params", lambda: torch_params)
    q = torch.zeros(3, 2, head_dim, dtype=dtype)
    assert resolve_varlen_backend(q, return_lse=return_lse) == expected


def test_explicit_backend_reasons(fake_gpu):
    fake_gpu.setattr(runtime, "flash_attn_problem", lambda: "the flash-attn package is not installed")
    fake_gpu.setattr(vmod, "_torch_varlen_params", lambda: frozenset({"is_causal"}))
    q = torch.zeros(3, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not installed"):
        resolve_varlen_backend(q, backend="flash_attn")
    with pytest.raises(ValueError, match="return_aux"):
        resolve_varlen_backend(q, backend="torch", return_lse=True)
    with pytest.raises(ValueError, match="fp16/bf16"):
        resolve_varlen_backend(q.float(), backend="torch")
    assert resolve_varlen_backend(q, backend="reference") == "reference"


# ------------------------------------------------------------- fused-backend glue on CPU, through fakes


def _check_fused_call(q, k, cu_q, cu_k, max_q, max_k):
    """What both flash kernels need from their arguments, and the upstream bug the op must steer around."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert cu_q.is_contiguous() and cu_k.is_contiguous(), "the flash kernels read dense offsets"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "the flash kernels need unit stride in head_dim"
    assert q.shape[-1] <= 256
    len_q, len_k = cu_q.diff(), cu_k.diff()
    assert max_q >= int(len_q.max()), f"max_q={max_q} is below the longest query sequence"
    assert max_k >= int(len_k.max()), f"max_k={max_k} is below the longest key sequence"
    batch, hkv = len_q.numel(), k.shape[1]
    if max_q == 1 and q.shape[1] > hkv and q.shape[0] != batch:
        # flash-attn's mha_varlen_fwd (and torch's vendored copy) reshape q to [batch, Hkv, group, D] when
        # the longest query is 1 with GQA: Dao-AILab/flash-attention #1537, #1619.
        shape = [batch, hkv, q.shape[1] // hkv, q.shape[2]]
        raise RuntimeError(f"shape '{shape}' is invalid for input of size {q.numel()}")


def _fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, *, padded_lse=False):
    """What a flash kernel returns, computed by the reference: out, and lse in the kernel layout ([Hq, T],
    or the padded [B, Hq, max_q] of old flash-attn) with +inf on rows that see no key. Those rows' output
    is poisoned so that the public op has to zero them itself."""
    _check_fused_call(q, k, cu_q, cu_k, max_q, max_k)
    out, lse = varlen_attention_reference(
        q, k, v, cu_q, max_q, causal=causal, scale=scale, cu_seqlens_k=cu_k, max_seqlen_k=max_k,
        return_lse=True,
    )  # fmt: skip
    blind = torch.isneginf(lse)
    out = out.masked_fill(blind[..., None], 123.0)
    lse = lse.masked_fill(blind, math.inf)
    if not padded_lse:
        return out, lse.transpose(0, 1).contiguous()
    lengths = cu_q.diff().tolist()
    padded = torch.full((len(lengths), q.shape[1], max(lengths)), float("nan"))
    for b, (start, length) in enumerate(zip(cu_q.tolist(), lengths, strict=False)):
        padded[b, :, :length] = lse[start : start + length].transpose(0, 1)
    return out, padded


def fake_varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                          scale=None, window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    assert isinstance(window_size, tuple) and window_size in ((-1, -1), (-1, 0))
    assert query.shape[-1] % 8 == 0, "torch's flash kernel needs head_dim % 8 == 0"
    assert enable_gqa or query.shape[1] == key.shape[1]
    causal = window_size == (-1, 0)
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def fake_varlen_attn_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                         is_causal=False):  # fmt: skip
    assert query.shape[-1] % 8 == 0 and query.shape[1] == key.shape[1]
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _fake_flash_module(padded):
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False, return_attn_probs=False, deterministic=False):  # fmt: skip
        assert dropout_p == 0.0
        calls.append({"deterministic": deterministic, "max_q": max_q, "max_k": max_k})
        out, lse = _fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, padded_lse=padded)
        return (out, lse, None) if return_attn_probs else out

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.calls = calls
    return module


FAKE_BACKENDS = {
    "torch-2.13": (
        "torch",
        lambda mp: mp.setattr(torch.nn.attention.varlen, "varlen_attn", fake_varlen_attn_2_13),
    ),
    "torch-old": (
        "torch",
        lambda mp: mp.setattr(torch.nn.attention.varlen, "varlen_attn", fake_varlen_attn_old),
    ),
    "flash": ("flash_attn", lambda mp: mp.setitem(sys.modules, "flash_attn", _fake_flash_module(False))),
    "flash-padded-lse": (
        "flash_attn",
        lambda mp: mp.setitem(sys.modules, "flash_attn", _fake_flash_module(True)),
    ),
}


def _install_fake(mp, fake: str) -> str:
    """Put a fake fused backend in place (fp32 allowed, so that comparisons are tight); returns its name."""
    import torch.nn.attention.varlen  # noqa: F401  (so the fake can replace its varlen_attn)

    name, install = FAKE_BACKENDS[fake]
    install(mp)
    mp.setattr(runtime, "flash_attn_problem", lambda: None)
    mp.setattr(vmod, "_FUSED_DTYPES", (torch.float32,))
    params = {"torch-2.13": TORCH_2_13_PARAMS, "torch-old": TORCH_OLD_PARAMS}.get(fake, TORCH_2_13_PARAMS)
    mp.setattr(vmod, "_torch_varlen_params", lambda: params)
    return name


@pytest.mark.parametrize("fake", list(FAKE_BACKENDS))
@pytest.mark.parametrize("separate_keys", [False, True])
def test_fused_backend_glue_matches_reference(fake_gpu, fake, separate_keys):
    """Argument mapping, GQA, head-dim padding, scale, lse layout and blind rows of the fused paths."""
    name = _install_fake(fake_gpu, fake)
    gen = torch.Generator().manual_seed(51)
    len_q = [3, 1, 8, 5]
    len_k = [10, 6, 8, 2] if separate_keys else len_q
    cu_q, cu_k = cu_from_lengths(len_q, dtype=torch.int64), cu_from_lengths(len_k, dtype=torch.int64)
    q = random_tensor(gen, sum(len_q), 8, 36, requires_grad=True)  # 36: padded to 40 for torch's kernel
    k, v = (random_tensor(gen, sum(len_k), 2, 36, requires_grad=True) for _ in range(2))
    extra = {"cu_seqlens_k": cu_k, "max_seqlen_k": max(len_k)} if separate_keys else {}
    grad_out = random_tensor(gen, sum(len_q), 8, 36)
    scale = 0.3  # the old signature has no scale argument: the backend folds it into q

    results = {}
    for backend in (name, "reference"):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = varlen_attention(*inputs, cu_q, 8, scale=scale, return_lse=True, backend=backend, **extra)
        out.backward(grad_out)
        results[backend] = (out, lse, *(t.grad for t in inputs))
    for what, a, e in zip(("out", "lse", "dq", "dk", "dv"), results[name], results["reference"], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, w=what: f"{w}: {m}")
    if separate_keys:  # seq 3 has Lq 5 > Lk 2: three rows with no key, poisoned by the fake kernel
        assert torch.isneginf(results[name][1]).sum() == 3 * 8


def test_fakes_check_max_lengths_and_reproduce_the_gqa_decode_bug():
    """The fakes would catch an understated max_q / max_k, and fail where the real kernels fail."""
    gen = torch.Generator().manual_seed(53)
    cu_q, cu_k = cu_from_lengths([1, 0, 1]), cu_from_lengths([4, 3, 2])
    q, k = random_tensor(gen, 2, 8, 16), random_tensor(gen, 9, 2, 16)
    with pytest.raises(AssertionError, match="max_q"):
        _check_fused_call(q, k, cu_q, cu_k, 0, 4)
    with pytest.raises(AssertionError, match="max_k"):
        _check_fused_call(q, k, cu_q, cu_k, 2, 3)
    with pytest.raises(RuntimeError, match="is invalid for input"):
        _check_fused_call(q, k, cu_q, cu_k, 1, 4)
    _check_fused_call(q, k, cu_q, cu_k, 2, 4)  # what the op passes
    _check_fused_call(q, k[:, :1].expand(-1, 8, -1), cu_q, cu_k, 1, 4)  # no GQA: no fast path


@pytest.mark.parametrize("fake", list(FAKE_BACKENDS))
@pytest.mark.parametrize("separate_keys", [True, False], ids=["beam-step", "self"])
def test_gqa_step_with_an_empty_query_sequence(fake_gpu, fake, separate_keys):
    """A beam-search step: one query row per live sample, none for a sample whose beams all finished, GQA,
    max_seqlen 1. The fused kernels must never see max_q < 2 (their GQA decode path breaks on it)."""
    name = _install_fake(fake_gpu, fake)
    gen = torch.Generator().manual_seed(57)
    len_q = [1, 0, 1, 1]
    len_k = [6, 4, 7, 2] if separate_keys else len_q
    cu_q, cu_k = cu_from_lengths(len_q), cu_from_lengths(len_k)
    q = random_tensor(gen, sum(len_q), 8, 32)
    k, v = (random_tensor(gen, sum(len_k), 2, 32) for _ in range(2))
    extra = {"cu_seqlens_k": cu_k, "max_seqlen_k": max(len_k)} if separate_keys else {}
    out = varlen_attention(q, k, v, cu_q, 1, backend=name, **extra)
    expected = varlen_attention(q, k, v, cu_q, 1, backend="reference", **extra)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if fake.startswith("flash"):
        assert sys.modules["flash_attn"].calls[-1]["max_q"] == 2


@pytest.mark.parametrize("fake", ["torch-2.13", "flash"])
def test_offsets_and_layouts_the_kernels_need(fake_gpu, fake):
    """A strided int32 cu_seqlens is made contiguous; q/k/v in the model's layout ([1, H, T, D] transposed
    to [T, H, D]: unit stride in D, not contiguous) go through as they are and give the same result."""
    name = _install_fake(fake_gpu, fake)
    gen = torch.Generator().manual_seed(59)
    lengths = [3, 1, 6]
    cu = cu_from_lengths(lengths)
    strided_cu = torch.stack([cu, torch.full_like(cu, -1)], dim=1).reshape(-1)[::2]
    assert strided_cu.dtype == torch.int32 and not strided_cu.is_contiguous()
    # [1, H, T, D] as transformers hands them to the attention hook, then [T, H, D] views.
    q, k, v = (random_tensor(gen, 1, heads, 10, 32)[0].transpose(0, 1) for heads in (8, 2, 2))
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = varlen_attention(q, k, v, strided_cu, 6, backend=name)
    dense = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, 6, backend=name)
    assert torch.equal(out, dense)
    expected = varlen_attention(q, k, v, cu, 6, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_reaches_flash_attn(fake_gpu, deterministic):
    name = _install_fake(fake_gpu, "flash")
    q = torch.randn(5, 4, 16, requires_grad=True)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    varlen_attention(q, k, v, cu_from_lengths([2, 3]), 3, deterministic=deterministic, backend=name)
    assert sys.modules["flash_attn"].calls[-1]["deterministic"] is deterministic


def test_torch_backend_says_when_its_backward_is_not_deterministic(fake_gpu, caplog):
    name = _install_fake(fake_gpu, "torch-2.13")
    vmod._warn_torch_backward_not_deterministic.cache_clear()
    q = torch.randn(5, 4, 16, requires_grad=True)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cu = cu_from_lengths([2, 3])
    with caplog.at_level(logging.WARNING, logger=vmod.__name__):
        varlen_attention(q, k, v, cu, 3, deterministic=True, backend=name)
        with torch.no_grad():  # no backward, nothing to warn about
            varlen_attention(q, k, v, cu, 3, deterministic=True, backend=name)
    assert caplog.text.count("use_deterministic_algorithms") == 1
    caplog.clear()
    vmod._warn_torch_backward_not_deterministic.cache_clear()
    fake_gpu.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with caplog.at_level(logging.WARNING, logger=vmod.__name__):
        varlen_attention(q, k, v, cu, 3, deterministic=True, backend=name)
    assert "use_deterministic_algorithms" not in caplog.text


def test_packed_llama_asks_for_deterministic_attention(monkeypatch):
    import types

    import patchrec.model.attention as attention_module

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return varlen_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "varlen_attention", spy)
    query, key = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    plan = attention_module.PackedPlan(cu_from_lengths([2, 3]), 3)
    out, _ = attention_module.packed_attention(
        types.SimpleNamespace(layer_idx=0), query, key, key, None, scaling=0.3, attention_plan=plan
    )
    assert seen["deterministic"] is True and out.shape == (1, 5, 4, 8)


@pytest.fixture
def fresh_flash_probe():
    runtime.flash_attn_problem.cache_clear()
    yield
    runtime.flash_attn_problem.cache_clear()


def _failing_import(monkeypatch, error: Exception) -> list[str]:
    tries, real_import = [], importlib.import_module

    def import_module(name, package=None):
        if name == "flash_attn":
            tries.append(name)
            raise error
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    return tries


def test_broken_flash_attn_falls_back_and_says_why(fake_gpu, fresh_flash_probe, caplog):
    """A flash-attn built against another torch: the package is there, its extension does not load."""
    symbol = "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    tries = _failing_import(fake_gpu, ImportError(symbol))
    fake_gpu.setattr(vmod, "_torch_varlen_params", lambda: TORCH_2_13_PARAMS)
    q = torch.zeros(3, 2, 64, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert resolve_varlen_backend(q) == "torch"
        assert resolve_varlen_backend(q) == "torch"
        assert runtime.HAS_FLASH_ATTN is False
    assert tries == ["flash_attn"]  # tried once per process
    assert caplog.text.count("undefined symbol") == 1 and "falls back" in caplog.text
    with pytest.raises(ValueError, match="does not import.*undefined symbol"):
        resolve_varlen_backend(q, backend="flash_attn")


def test_missing_flash_attn_is_reported_quietly(fake_gpu, fresh_flash_probe, caplog):
    _failing_import(fake_gpu, ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn"))
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert runtime.flash_attn_problem() == "the flash-attn package is not installed"
    assert caplog.text == ""
    runtime.flash_attn_problem.cache_clear()
    _failing_import(fake_gpu, ModuleNotFoundError("No module named 'einops'", name="einops"))
    assert "does not import" in runtime.flash_attn_problem()


def test_lse_layouts_normalised():
    gen = torch.Generator().manual_seed(61)
    cu = cu_from_lengths([2, 3])
    token_major = random_tensor(gen, 5, 3)
    token_major[1, 2] = math.inf  # a kernel's empty row
    expected = token_major.masked_fill(token_major == math.inf, -math.inf)
    head_major = token_major.transpose(0, 1).contiguous()
    padded = torch.full((2, 3, 3), float("nan"))
    padded[0, :, :2], padded[1, :, :3] = head_major[:, :2], head_major[:, 2:]
    for lse in (token_major, head_major, padded):
        torch.testing.assert_close(vmod._lse_token_major(lse, cu, 5, 3), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="lse shape"):
        vmod._lse_token_major(torch.zeros(4, 4), cu, 5, 3)
