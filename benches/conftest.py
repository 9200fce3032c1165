"""Bench setup.

Unlike tests/, benches never turn on the Triton interpreter: it checks kernel logic and is far too slow to
time. On a CPU-only machine the ops therefore run their pure-PyTorch references (what ``backend="auto"``
picks there), and the Triton providers of bench_patch_embed skip without CUDA.
"""

import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("unset TRITON_INTERPRET for benchmarks: interpreted kernels are not worth timing")
