"""Compile every Triton kernel for sm_80 and sm_90 on a machine without a GPU, and report what each costs.

    python -m patchrec_kernels.compile_report [--arch 80,90] [--dims 1,64,123,576,2048] [--json PATH]

Triton compiles for whatever target its driver reports. A compile-only driver reports
``GPUTarget("cuda", arch, 32)`` and every ``JITFunction.run`` becomes a warm-up (compile, never launch), so
the real launchers, called on small CPU tensors, produce exactly the binaries a GPU run would: the same
signature, constexprs and divisibility-by-16 specialisation of pointers and integers (CPU allocations are
aligned like CUDA ones). ptxas, shipped in the triton wheel (Triton 3.9 compiles sm_90 with its bundled
``ptxas-blackwell``), reports registers, spills and stack per binary; Triton's metadata gives the shared
memory and warps.

The sweep covers every launcher in ``SWEEPS`` over bf16/fp16/fp32 tables, three index layouts (all int32,
all int64, and the packer's int32 ids with int64 offsets) and ``DIMS``. The exit status is 1 when a launch
fails to compile, a binary spills registers, or a ``@triton.jit`` kernel of ``patchrec_kernels`` was never
compiled by the sweep (a new kernel needs its launcher in ``SWEEPS``); the default test suite runs it
(``tests/test_compile_report.py``).

``@triton.jit`` decides at import time whether a kernel is compiled or interpreted (``TRITON_INTERPRET``,
set by ``tests/conftest.py`` on CPU machines), so when this process holds interpreted kernels the report
re-runs itself in a child process with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

import patchrec_kernels
from patchrec_kernels.patch_embed import patch_embed_bwd, patch_embed_fwd
from patchrec_kernels.runtime import HAS_TRITON

ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (token ids, segment offsets, row offsets): uniform layouts, and what patchrec.batching.pack produces.
INDEX_LAYOUTS = {
    "int32": (torch.int32, torch.int32, torch.int32),
    "int64": (torch.int64, torch.int64, torch.int64),
    "packer": (torch.int32, torch.int64, torch.int64),
}
# 1: Triton turns an integer argument equal to 1 into a constant; 64, 576, 2048: multiples of 16 (another
# specialisation); 123: neither; 576 and 2048: SmolLM2-135M's and Llama-3.2-1B's widths.
DIMS = (1, 64, 123, 576, 2048)

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Launch:
    """One kernel launch of the sweep, compiled for one architecture."""

    kernel: str  # module-qualified name of the @triton.jit function
    arch: int  # compute capability x 10 (80: A100, 90: H100)
    dtype: str  # embedding table / gradient dtype
    index: str  # index layout (INDEX_LAYOUTS key)
    dim: int  # D, the row width
    constexprs: str = ""  # the launch's CAPS constexprs, e.g. "BLOCK_T=16 BLOCK_D=64"
    registers: int | None = None  # per thread, from ptxas -v
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack: int | None = None  # bytes of stack frame (local memory) per thread
    shared: int | None = None  # bytes of shared memory per program (Triton's allocation)
    warps: int | None = None
    error: str | None = None  # why the launch failed to compile

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


# --------------------------------------------------------------------------------------- the sweep


def _patch_embed_launches(dtype, index_dtypes, dim) -> Iterator[tuple[str, Callable[[], object]]]:
    ids_dtype, seg_dtype, row_dtype = index_dtypes
    vocab = 40
    gen = torch.Generator().manual_seed(0)
    # A text token, an item patch longer than BLOCK_T, a session patch: every loop runs and masks.
    seg_offsets = torch.tensor([0, 1, 21, 24, 29], dtype=seg_dtype)
    row_offsets = torch.tensor([0, 1, 2, 4], dtype=row_dtype)
    token_ids = torch.randint(0, vocab, (29,), generator=gen).to(ids_dtype)
    weight = torch.randn(vocab, dim, generator=gen).to(dtype)
    grad_out = torch.randn(3, dim, generator=gen).to(dtype)
    index = (token_ids, seg_offsets, row_offsets)
    yield "patch_embed_fwd", lambda: patch_embed_fwd(weight, *index)
    yield "patch_embed_bwd(sorted)", lambda: patch_embed_bwd(grad_out, *index, vocab, deterministic=True)
    yield "patch_embed_bwd(atomic)", lambda: patch_embed_bwd(grad_out, *index, vocab, deterministic=False)


# Every op with Triton kernels: (table dtype, index dtypes, D) -> (launcher name, call) pairs.
SWEEPS: dict[str, Callable] = {"patch_embed": _patch_embed_launches}


# ------------------------------------------------------------------------------ compile-only Triton


def discover_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function defined in a ``patchrec_kernels`` module, by qualified name."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.walk_packages(patchrec_kernels.__path__, "patchrec_kernels."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and obj.fn.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


class _CompileOnlyDriver:
    """Just enough of a Triton driver to compile: a target, a device id and a stream, no GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # JITFunction caches its binder (and so its target) per device: one id per arch keeps sm_80 and
        # sm_90 binaries apart within one process.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


# ptxas -v facts per compiled binary (CompiledKernel.hash), kept for the life of the process: a binary that
# Triton serves from its in-process cache prints no ptxas log again.
_PTXAS_INFO: dict[str, dict] = {}


def _ptxas_info(log: str) -> dict:
    registers, frame = _PTXAS_REGISTERS.search(log), _PTXAS_FRAME.search(log)
    if registers is None or frame is None:
        return {}
    stack, stores, loads = (int(x) for x in frame.groups())
    return dict(registers=int(registers.group(1)), stack=stack, spill_stores=stores, spill_loads=loads)


@contextlib.contextmanager
def compile_only(arch: int, record: Callable[[str, object, dict, str | None], None]):
    """Within the block, every Triton launch compiles for ``arch`` and calls ``record(kernel name, compiled
    kernel or None, constexprs, error)`` instead of running. The driver, ``JITFunction.run`` and Triton's
    knobs are restored afterwards."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # where dump_ptxas_log prints
                kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:
            record(self._fn_name, None, constexprs, f"{type(error).__name__}: {error}".strip())
            raise
        if kernel.hash not in _PTXAS_INFO:
            _PTXAS_INFO[kernel.hash] = _ptxas_info(log.getvalue())
        record(self._fn_name, kernel, constexprs, None)
        return kernel

    saved_driver = driver._active
    with knobs.cache.scope(), knobs.nvidia.scope(), tempfile.TemporaryDirectory() as cache_dir:
        # A fresh on-disk cache, so that every new binary goes through ptxas and its -v log is seen.
        knobs.cache.dir = cache_dir
        knobs.nvidia.dump_ptxas_log = True
        driver.set_active(_CompileOnlyDriver(arch))
        JITFunction.run = compile_instead
        try:
            yield
        finally:
            JITFunction.run = run
            driver._active = saved_driver


def sweep(archs=ARCHS, dims=DIMS) -> tuple[list[Launch], list[str]]:
    """Compile every launcher of ``SWEEPS``; returns the launches and the kernels the sweep never compiled.

    A launcher whose compile fails is recorded as a failed launch and the sweep goes on.
    """
    launches: list[Launch] = []
    where: dict = {}  # the case being swept, for record()

    def record(name, kernel, constexprs, error):
        launch = Launch(name, **where, error=error)
        launch.constexprs = " ".join(f"{k}={v}" for k, v in constexprs.items())
        if kernel is not None:
            launch.shared, launch.warps = kernel.metadata.shared, kernel.metadata.num_warps
            for key, value in _PTXAS_INFO.get(kernel.hash, {}).items():
                setattr(launch, key, value)
        launches.append(launch)

    for arch in archs:
        with compile_only(arch, record):
            for dtype, index, dim in itertools.product(DTYPES, INDEX_LAYOUTS, dims):
                where.update(arch=arch, dtype=dtype, index=index, dim=dim)
                for op, launches_of in SWEEPS.items():
                    for launcher, call in launches_of(DTYPES[dtype], INDEX_LAYOUTS[index], dim):
                        count = len(launches)
                        try:
                            call()
                        except Exception as error:
                            if len(launches) == count or launches[-1].error is None:
                                # It failed outside a kernel's compile (record saw no error): the launcher's.
                                message = f"{type(error).__name__}: {error}"
                                launches.append(Launch(f"{op}:{launcher}", **where, error=message))
    compiled = {launch.kernel for launch in launches if launch.error is None}
    return launches, sorted(set(discover_kernels()) - compiled)


# ---------------------------------------------------------------------------------------------- report


def _row(launch: Launch) -> tuple[str, ...]:
    name = launch.kernel.rsplit(".", 1)[-1]
    where = (name, f"sm_{launch.arch}", launch.dtype, launch.index, str(launch.dim))
    if launch.error is not None:
        # Triton's CompilationError starts with the source position and ends with the cause.
        cause = launch.error.strip().splitlines()[-1]
        return (*where, f"FAILED: {cause[:80]}", "", "", "", "", "")
    show = lambda v: "?" if v is None else str(v)
    spills = f"{show(launch.spill_stores)}/{show(launch.spill_loads)}"
    costs = (show(launch.registers), spills, show(launch.stack), show(launch.shared), show(launch.warps))
    return (*where, launch.constexprs, *costs)


def format_table(launches: list[Launch]) -> str:
    header = ("kernel", "arch", "dtype", "index", "D", "constexprs", "regs", "spill st/ld", "stack", "smem",
              "warps")  # fmt: skip
    rows = [header, *map(_row, launches)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows[1:])])


def summary(launches: list[Launch], uncompiled: list[str]) -> dict:
    failures = [launch for launch in launches if launch.error is not None]
    spills = [launch for launch in launches if launch.spills]
    unmeasured = [launch for launch in launches if launch.error is None and launch.registers is None]
    return {
        "launches": len(launches),
        "failures": len(failures),
        "spills": len(spills),
        "unmeasured": len(unmeasured),
        "kernels": sorted({launch.kernel for launch in launches if launch.error is None}),
        "uncompiled": uncompiled,
        "ok": not (failures or spills or unmeasured or uncompiled),
    }


def _interpreted_here() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(k, InterpretedFunction) for k in discover_kernels().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m patchrec_kernels.compile_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="compute capabilities x 10, comma-separated (default: 80,90)")  # fmt: skip
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="row widths D, comma-separated")
    parser.add_argument("--json", metavar="PATH", help="also write the launches and the summary as JSON")
    args = parser.parse_args(argv)
    if not HAS_TRITON:
        print("triton is not installed: nothing to compile", file=sys.stderr)
        return 2
    if _interpreted_here():
        argv = sys.argv[1:] if argv is None else argv
        child = [sys.executable, "-m", "patchrec_kernels.compile_report", *argv]
        return subprocess.run(child, env={**os.environ, "TRITON_INTERPRET": "0"}).returncode
    archs = [int(a) for a in args.arch.split(",") if a]
    dims = [int(d) for d in args.dims.split(",") if d]
    launches, uncompiled = sweep(archs, dims)
    result = summary(launches, uncompiled)
    print(format_table(launches))
    print(f"\n{result['launches']} launches, {result['failures']} failures, {result['spills']} with spills, "
          f"{result['unmeasured']} without a ptxas report; archs {archs}")  # fmt: skip
    for name in uncompiled:
        print(f"NOT COMPILED: {name} (add its launcher to SWEEPS in {__name__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "archs": archs, "dims": dims, "launches": [asdict(x) for x in launches]}, f,
                      indent=1)  # fmt: skip
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
