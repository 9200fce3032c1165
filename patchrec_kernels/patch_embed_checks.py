"""``patch_embed``'s input checks: each raises ``ValueError`` naming the offending argument.

``check_structure`` looks at shapes, dtypes and devices only (free, so it always runs, also under
torch.compile with symbolic shapes); ``check_values`` reads the index tensors (one device sync) and runs when
validation is on.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def check_structure(weight, token_ids, seg_offsets, row_offsets) -> None:
    """Shape, dtype and device checks: free (no device reads), so they always run."""
    if weight.ndim != 2 or weight.dtype not in _FLOAT_DTYPES:
        got = f"{weight.dtype} with shape {tuple(weight.shape)}"
        raise ValueError(f"weight must be a 2-D float32/bfloat16/float16 tensor [V, D], got {got}")
    indices = {"token_ids": token_ids, "seg_offsets": seg_offsets, "row_offsets": row_offsets}
    for name, tensor in indices.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim != 1 or tensor.dtype not in _INDEX_DTYPES:
            got = f"{tensor.dtype} with shape {tuple(tensor.shape)}"
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {got}")
        if tensor.device != weight.device:
            raise ValueError(f"{name} is on {tensor.device} but weight is on {weight.device}")
    for name, tensor in (("seg_offsets", seg_offsets), ("row_offsets", row_offsets)):
        if tensor.numel() == 0:
            raise ValueError(f"{name} must hold at least one element (the leading 0)")
    num_rows, num_segments = row_offsets.numel() - 1, seg_offsets.numel() - 1
    # Emptiness mismatches are visible from the shapes alone, so catch them even with validation off.
    # Spelled with and/or, not as (a == 0) != (b == 0): torch.compile cannot compare two symbolic booleans.
    if (num_rows == 0 or num_segments == 0) and not (num_rows == 0 and num_segments == 0):
        raise ValueError(
            f"row_offsets describes {num_rows} rows over {num_segments} segments: every row needs at least "
            "one segment and every segment belongs to a row"
        )
    num_tokens = token_ids.numel()
    if (num_segments == 0 or num_tokens == 0) and not (num_segments == 0 and num_tokens == 0):
        raise ValueError(
            f"seg_offsets describes {num_segments} segments over {token_ids.numel()} tokens: every segment "
            "needs at least one token and every token belongs to a segment"
        )


def _check_offsets(name: str, offsets: torch.Tensor, length: int, what: str) -> list:
    steps = offsets[1:] - offsets[:-1]
    return [
        (offsets[0] != 0, f"{name} must start at 0"),
        (offsets[-1] != length, f"{name} must end at the number of {what} ({length})"),
        ((steps < 0).any(), f"{name} must be non-decreasing"),
        ((steps == 0).any(), f"{name} has an empty entry (two equal offsets); each needs >= 1 of {what}"),
    ]


def check_values(weight, token_ids, seg_offsets, row_offsets) -> None:
    """Checks that read index values. All conditions go to the host in one transfer: a single sync."""
    num_embeddings = weight.shape[0]
    checks = _check_offsets("seg_offsets", seg_offsets, token_ids.numel(), "tokens")
    checks += _check_offsets("row_offsets", row_offsets, seg_offsets.numel() - 1, "segments")
    if token_ids.numel():
        bad_ids = ((token_ids < 0) | (token_ids >= num_embeddings)).any()
        checks.append((bad_ids, f"token_ids must lie in [0, {num_embeddings}) (the rows of weight)"))
    failed = torch.stack([torch.as_tensor(flag, device=weight.device) for flag, _ in checks]).tolist()
    for bad, (_, message) in zip(failed, checks, strict=True):
        if bad:
            raise ValueError(message)
