"""Pure-PyTorch reference of ``patch_embed``: the two-level ragged mean written the obvious way.

It materialises the [T, D] gather that the fused kernel avoids, which is fine for a reference: it exists to be
read and compared against, and it runs on any device and dtype. Autograd differentiates it end to end.
"""

from __future__ import annotations

import torch


def patch_embed_reference(
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    seg_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
) -> torch.Tensor:
    """``out[r] = mean over segments s of row r of (mean over tokens t of s of weight[token_ids[t]])``.

    Args:
        weight: [V, D] embedding table, any floating dtype.
        token_ids: [T] int32/int64 ids into ``weight``.
        seg_offsets: [S + 1] token boundaries of the segments (starts at 0, ends at T).
        row_offsets: [R + 1] segment boundaries of the rows (starts at 0, ends at S).

    Returns:
        [R, D] in ``weight``'s dtype. Inputs are trusted; ``patch_embed`` validates before calling this.
    """
    device = weight.device
    num_segments = seg_offsets.numel() - 1
    num_rows = row_offsets.numel() - 1
    tokens_per_segment = seg_offsets.diff().long()
    segments_per_row = row_offsets.diff().long()
    # output_size makes every shape here a function of the input shapes alone (no device sync, and
    # torch.compile traces it with dynamic shapes instead of breaking the graph on a data-dependent size).
    segment_of_token = torch.repeat_interleave(
        torch.arange(num_segments, device=device), tokens_per_segment, output_size=token_ids.shape[0]
    )
    row_of_segment = torch.repeat_interleave(
        torch.arange(num_rows, device=device), segments_per_row, output_size=num_segments
    )

    # Upcast first so that bf16/fp16 tables are summed in fp32, as the kernel does.
    token_rows = weight.float()[token_ids.long()]
    dim = weight.shape[1]
    segment_sum = token_rows.new_zeros(num_segments, dim).index_add(0, segment_of_token, token_rows)
    segment_mean = segment_sum / tokens_per_segment[:, None]
    row_sum = segment_mean.new_zeros(num_rows, dim).index_add(0, row_of_segment, segment_mean)
    row_mean = row_sum / segments_per_row[:, None]
    return row_mean.to(weight.dtype)
