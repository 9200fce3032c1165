"""What this process can run: Triton (compiled or interpreted), flash-attn, torch's varlen attention.

Kept apart from the ops so that every op makes the same choice for the same tensor.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re

import numpy as np
import torch

logger = logging.getLogger(__name__)

try:  # triton is a Linux-only dependency; the ops fall back to their references without it
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


@functools.lru_cache(maxsize=1)
def flash_attn_problem() -> str | None:
    """Why flash-attn cannot be used in this process, or None when it imports.

    flash-attn is an optional extra (`pip install "patchrec[gpu]"`) whose CUDA extension is built against one
    torch: installed next to another torch, the package exists but its import fails (undefined symbols). So
    the import itself is tried, once per process and only when first needed (it loads CUDA code), and a
    failure is logged with its reason so that ``backend="auto"`` visibly falls back.
    """
    try:
        importlib.import_module("flash_attn").flash_attn_varlen_func  # noqa: B018
    except ModuleNotFoundError as error:
        if error.name == "flash_attn":
            return "the flash-attn package is not installed"
        return _flash_attn_broken(error)  # flash-attn is there, one of its own imports is not
    except Exception as error:  # ImportError, OSError (a missing .so), RuntimeError, AttributeError...
        return _flash_attn_broken(error)
    return None


def _flash_attn_broken(error: Exception) -> str:
    reason = f"flash-attn is installed but does not import ({type(error).__name__}: {error})"
    logger.warning("%s; varlen_attention falls back to torch's varlen attention or the reference", reason)
    return reason


def __getattr__(name: str):
    # HAS_FLASH_ATTN is computed on first use, so that `import patchrec_kernels` never loads flash-attn.
    if name == "HAS_FLASH_ATTN":
        return flash_attn_problem() is None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must be set before ``patchrec_kernels`` is imported: Triton reads it when a
    ``@triton.jit`` function is defined.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string such as "3.6.0", "2.4.0rc1" or "3.7.0+git1a2b"."""
    return tuple(int(m.group()) for m in (re.match(r"\d+", part) for part in version.split(".")[:3]) if m)


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with the installed triton and numpy, or None.

    Triton < 3.7's interpreter turns one-element arrays into Python ints with ``int(array)``, which numpy
    >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars", Triton issue 9171, fixed
    in 3.7): every kernel launch would fail deep inside ``triton/runtime/interpreter.py``. Compiled CUDA
    kernels do not use the interpreter and are unaffected. The versions default to the installed ones."""
    if triton_version is None:
        if not HAS_TRITON:
            return None
        triton_version = triton.__version__
    numpy_version = numpy_version or np.__version__
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) does not run with numpy "
                f"{numpy_version}: install numpy<2.4 or triton>=3.7 for CPU kernels, or unset "
                "TRITON_INTERPRET to use the PyTorch references (CUDA kernels are unaffected)")
    return None


def triton_can_run(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``tensor``: CUDA tensors always, CPU tensors under the interpreter.

    Launching on a CPU tensor without the interpreter fails with "0 active drivers", so the public ops use
    this to pick their pure-PyTorch reference instead. Under an interpreter that cannot run with the
    installed numpy (``interpreter_problem``) it raises one ``RuntimeError`` saying so, rather than letting
    the launch fail inside Triton.
    """
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    if tensor.device.type != "cpu" or not triton_interpret():
        return False
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return True


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


def launch_device(tensor: torch.Tensor):
    """The context to launch a Triton kernel on ``tensor`` in.

    Triton launches on the current CUDA device (and its current stream), not on the device of the tensors it
    is given: a tensor on ``cuda:1`` while ``cuda:0`` is current would be read by a kernel running on the
    wrong GPU. CPU tensors (the interpreter) need no device.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
