"""patch_embed: input checks (ValueError naming the argument), validation switches and backend dispatch."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest
import torch
from patch_embed_helpers import (
    Batch,
    make_batch,
)

import patchrec_kernels.reference.patch_embed as ref_module
from patchrec_kernels.patch_embed import patch_embed, patch_embed_fwd
from patchrec_kernels.reference.patch_embed import patch_embed_reference

# The package re-exports the op under the module's name, so fetch the module itself.
pe_module = importlib.import_module("patchrec_kernels.patch_embed")

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


