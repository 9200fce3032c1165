"""patchrec_kernels: GPU kernels for packed, compressed LLM inputs, each with a pure-PyTorch reference.

The package knows tensors, not recommendation. Ops:
- ``patch_embed``: fused two-level ragged mean of embedding rows (text tokens, item patches, session patches).
- ``varlen_attention``: causal attention over packed sequences (flash-attn | torch varlen | CPU flash |
  reference).

``python -m patchrec_kernels.compile_report`` compiles every Triton kernel for sm_80 / sm_90 without a GPU.
"""

from patchrec_kernels import runtime
from patchrec_kernels.patch_embed import patch_embed
from patchrec_kernels.reference.patch_embed import patch_embed_reference
from patchrec_kernels.reference.varlen_attention import varlen_attention_reference
from patchrec_kernels.runtime import HAS_TRITON, triton_can_run, triton_interpret
from patchrec_kernels.varlen_attention import resolve_varlen_backend, varlen_attention

__all__ = [
    "HAS_FLASH_ATTN",
    "HAS_TRITON",
    "patch_embed",
    "patch_embed_reference",
    "resolve_varlen_backend",
    "triton_can_run",
    "triton_interpret",
    "varlen_attention",
    "varlen_attention_reference",
]


def __getattr__(name: str):
    # HAS_FLASH_ATTN tries the import on first use (see runtime.flash_attn_problem), not at package import.
    if name == "HAS_FLASH_ATTN":
        return runtime.HAS_FLASH_ATTN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
