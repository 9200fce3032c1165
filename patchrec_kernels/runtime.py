"""What this process can run: Triton (compiled or interpreted), flash-attn, torch's varlen attention.

Kept apart from the ops so that every op makes the same choice for the same tensor.
"""

from __future__ import annotations

import importlib.util
import os

import torch

try:  # triton is a Linux-only dependency; the ops fall back to their references without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

# flash-attn is an optional extra (`pip install "patchrec[gpu]"`). Only look for it here: importing it
# pulls CUDA extensions, so the import itself happens lazily in the attention op.
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must be set before ``patchrec_kernels`` is imported: Triton reads it when a
    ``@triton.jit`` function is defined.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``tensor``: CUDA tensors always, CPU tensors under the interpreter.

    Launching on a CPU tensor without the interpreter fails with "0 active drivers", so the public ops use
    this to pick their pure-PyTorch reference instead.
    """
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and triton_interpret()


def validation_enabled(validate: bool | None) -> bool:
    """Resolve an op's ``validate`` argument.

    Value checks on index tensors (monotonic offsets, ids in range, lengths) read device memory and so
    synchronise with the GPU. They are on by default; turn them off on a hot path either per call
    (``validate=False``) or for the whole process with ``PATCHREC_KERNELS_VALIDATE=0``. Shape, dtype and
    device checks cost nothing and always run.
    """
    if validate is not None:
        return bool(validate)
    return os.environ.get("PATCHREC_KERNELS_VALIDATE", "1") not in ("", "0")
