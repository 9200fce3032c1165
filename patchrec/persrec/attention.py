"""PerSRec attention on a ``BlockLayout``: one ``varlen_attention`` call per layer, no dense mask."""

from __future__ import annotations

import torch

from patchrec.batching.blocks import BlockLayout
from patchrec_kernels.varlen_attention import varlen_attention


def block_keys(x: torch.Tensor, layout: BlockLayout, context: torch.Tensor | None = None) -> torch.Tensor:
    """The keys (or values) of every block, [K, ...]: ``cat([context, x])`` at ``layout.key_index``."""
    source = x if context is None else torch.cat([context, x])
    return source.index_select(0, layout.key_index)


def block_state(x: torch.Tensor, layout: BlockLayout, context: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's state rows after the batch, [S, ...] (see ``BlockLayout.state_index``)."""
    source = x if context is None else torch.cat([context, x])
    return source.index_select(0, layout.state_index)


def segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    context_k: torch.Tensor | None = None,
    context_v: torch.Tensor | None = None,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of packed rows q/k/v [R, H, D] under PerSRec's rule (``patchrec.persrec.layout``).

    ``context_k`` / ``context_v`` [C, Hkv, D]: a cached state (earlier blocks' carried rows, per sequence in
    the layout's order) that every block of its sequence sees before its own rows.
    """
    if (context_k is None) != (context_v is None):
        raise ValueError("context_k and context_v must be given together")
    keys = block_keys(k, layout, context_k)
    values = block_keys(v, layout, context_v)
    return varlen_attention(
        q, keys, values, layout.cu_q, layout.max_q, causal=True, scale=scale,
        cu_seqlens_k=layout.cu_k, max_seqlen_k=layout.max_k, deterministic=deterministic, backend=backend,
        validate=False,
    )  # fmt: skip
