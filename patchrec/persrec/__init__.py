"""PerSRec (docs/method.md §6): learnable personalization tokens after each old-history segment, with
segment-isolated attention, so that their keys/values are a cached per-user state.

- ``layout``: which rows exist and which earlier rows each block sees (``BlockLayout``, ``item_rows``);
- ``attention``: the layout as one ``varlen_attention`` call per layer;
- ``reference``: the explicit dense mask, the ground truth the tests compare with;
- ``sequence``: the ID models' side (SASRec, HSTU): full forward, ``PersrecState``, folding segments into it,
  ranking from it, and ``CachedUser`` (a user's state kept up to date as interactions arrive);
- ``stored``: one user's state as safetensors bytes, and stored states batched again (``patchrec serve``);
- ``llm``: the LLM ``persrec`` plan's prompt encoding, whole or from a cached state (imported on its own:
  it builds on ``patchrec.batching.pack`` and ``patchrec.eval.exact``).
"""

from patchrec.persrec.attention import block_keys, block_state, segmented_attention
from patchrec.persrec.layout import BlockLayout, ItemRows, block_layout, item_rows, num_segments

__all__ = [
    "BlockLayout",
    "ItemRows",
    "block_keys",
    "block_layout",
    "block_state",
    "item_rows",
    "num_segments",
    "segmented_attention",
]
