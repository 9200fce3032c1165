"""Bench setup.

Unlike tests/, benches never turn on the Triton interpreter: it checks kernel logic and is far too slow to
time. On a CPU-only machine ``patch_embed`` therefore runs its pure-PyTorch reference and attention its CPU
backend (what ``backend="auto"`` picks there); the Triton providers of bench_patch_embed skip without
CUDA.
"""

import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("unset TRITON_INTERPRET for benchmarks: interpreted kernels are not worth timing")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # On the 2-core CPU machine the cores are shared with other jobs: two intra-op threads then spin at
    # barriers while the other core is busy, which turns small ops into noise. One thread gives steadier
    # side-by-side ratios. GPUs are left alone.
    if torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_benchmark_update_machine_info(config, machine_info):
    # Every benchmark JSON carries the command that wrote it and how busy the machine was, so that a
    # committed result can be re-run exactly and its timings read in context (docs/results.md).
    machine_info["command"] = " ".join(["python -m pytest", *sys.argv[1:]])
    machine_info["load_avg_start"] = list(os.getloadavg())
