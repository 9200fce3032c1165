"""patchrec_kernels: GPU kernels for packed, compressed LLM inputs, each with a pure-PyTorch reference.

The package knows tensors, not recommendation. Ops:
- ``patch_embed``: fused two-level ragged mean of embedding rows (text tokens, item patches, session patches).
- ``varlen_attention``: causal attention over packed sequences (flash-attn | torch varlen | reference).
"""

from patchrec_kernels.runtime import HAS_FLASH_ATTN, HAS_TRITON, triton_can_run, triton_interpret

__all__ = ["HAS_FLASH_ATTN", "HAS_TRITON", "triton_can_run", "triton_interpret"]
