"""Every ``@triton.jit`` kernel of patchrec_kernels compiled for sm_80 and sm_90 on this CPU machine, through
its real launcher, with ptxas reporting registers and spills (``python -m patchrec_kernels.compile_report``).

The sweep runs once per test session in a child process with ``TRITON_INTERPRET=0`` (conftest turns the
interpreter on in this one, which makes ``@triton.jit`` build interpreter objects); about 30 s on 2 cores.
A kernel added to patchrec_kernels without a launcher in ``compile_report.SWEEPS`` fails the coverage test.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from patchrec_kernels import compile_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "report.json"
    command = [sys.executable, "-m", "patchrec_kernels.compile_report", "--json", str(path)]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not path.exists():
        pytest.fail(f"the compile report wrote no JSON (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, json.loads(path.read_text())


def test_every_launch_compiles_for_sm80_and_sm90_without_spills(report):
    proc, data = report
    launches = data["launches"]
    failed = [x for x in launches if x["error"]]
    assert not failed, failed[:5]
    spilled = [x for x in launches if x["spill_stores"] or x["spill_loads"]]
    assert not spilled, spilled[:5]
    assert all(x["registers"] and x["warps"] for x in launches), "a binary without a ptxas report"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(launches)} launches, 0 failures, 0 with spills" in proc.stdout


def test_sweep_covers_every_kernel_arch_dtype_index_layout_and_width(report):
    _, data = report
    kernels = set(compile_report.discover_kernels())
    assert len(kernels) >= 3 and not data["uncompiled"]
    assert set(data["kernels"]) == kernels
    seen = {(x["kernel"], x["arch"], x["dtype"], x["index"], x["dim"]) for x in data["launches"]}
    cr = compile_report
    wanted = itertools.product(kernels, cr.ARCHS, cr.DTYPES, cr.INDEX_LAYOUTS, cr.DIMS)
    assert set(wanted) <= seen


def test_d576_runs_as_unpadded_64_wide_blocks(report):
    _, data = report
    blocks = {x["constexprs"] for x in data["launches"] if x["dim"] == 576}
    assert blocks == {"BLOCK_T=16 BLOCK_D=64"}


def test_report_fails_on_an_uncompiled_kernel_a_failure_or_a_spill():
    ok = compile_report.Launch("k", 80, "bf16", "int32", 64, registers=40, spill_stores=0, spill_loads=0)
    assert compile_report.summary([ok], [])["ok"]
    assert not compile_report.summary([ok], ["patchrec_kernels.new_op._new_op_fwd_kernel"])["ok"]
    spilled = compile_report.Launch("k", 90, "fp32", "int64", 2048, registers=255, spill_stores=8)
    assert compile_report.summary([ok, spilled], [])["spills"] == 1
    failed = compile_report.Launch("k", 90, "fp16", "int64", 1, error="CompilationError: ...")
    result = compile_report.summary([ok, failed], [])
    assert result["failures"] == 1 and not result["ok"]
    assert "FAILED: CompilationError: ..." in compile_report.format_table([ok, failed])


def test_compile_only_compiles_in_this_process_and_restores_triton():
    """The compile-only driver also works next to the interpreter, and leaves Triton as it found it."""
    import triton.language as tl
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)

    kernel = JITFunction(_copy_kernel)  # built directly: @triton.jit would interpret it here
    before = (driver._active, JITFunction.run, knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
    records = []
    x = torch.randn(100)
    with compile_report.compile_only(90, lambda *record: records.append(record)):
        kernel[(1,)](x, torch.empty_like(x), 100, BLOCK=128)
    assert (driver._active, JITFunction.run, knobs.cache.dir, knobs.nvidia.dump_ptxas_log) == before
    (name, compiled, constexprs, error), = records
    assert error is None and constexprs == {"BLOCK": 128} and name.endswith("_copy_kernel")
    assert compiled.metadata.target.arch == 90
    assert compile_report._PTXAS_INFO[compiled.hash]["registers"] > 0
