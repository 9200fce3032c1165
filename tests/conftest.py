"""Shared test setup.

Triton reads TRITON_INTERPRET when kernels are defined, so it is set here, before any test module imports
patchrec_kernels. Without CUDA the kernels run in the interpreter on CPU tensors (small shapes only);
with CUDA they are compiled and the kernel tests run on the GPU.
"""

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if HAS_CUDA else "1")
# Define the kernels now, under that setting: a test that imports them first while it has switched the
# interpreter off (the reference_ops fixture) would otherwise leave them compiled-only for every later test.
import patchrec_kernels  # noqa: E402, F401
from patchrec_kernels.runtime import interpreter_problem, triton_interpret  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3"


def pytest_sessionstart(session):
    # Without CUDA the kernel tests need Triton's interpreter; with a triton/numpy pair it cannot run
    # (runtime.interpreter_problem: triton < 3.7 with numpy >= 2.4) every kernel launch would fail inside
    # Triton. The run stops here, red, with that one message instead.
    if not HAS_CUDA and triton_interpret():
        problem = interpreter_problem()
        if problem is not None:
            pytest.exit(f"unsupported environment for the test suite: {problem}", returncode=1)


def pytest_collection_modifyitems(config, items):
    # The one GPU marker: `@pytest.mark.gpu` tests skip cleanly on a CPU-only machine.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels are exercised: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the calling test is skipped when it is absent (e.g. a bare clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture
def reference_ops(monkeypatch):
    """For tests that train or rank with real shapes on CPU: the ops' pure-PyTorch references instead of the
    Triton interpreter (minutes otherwise: the interpreter runs a kernel element-block by element-block; the
    ops read TRITON_INTERPRET per call)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def reference_ops_one_thread(reference_ops):
    """``reference_ops`` with one intra-op thread: for many small steps, two OpenMP threads stall behind
    other processes on a shared 2-core machine (measured 1 s vs 25 s for the same run); results do not
    depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
