"""Plain-PyTorch ground truth for PerSRec attention: the explicit dense mask of docs/method.md §6, row by row.

Deliberately built from each row's role (prefix text, an item or T token of old segment s, a recent row)
rather than from blocks, so that a mistake in ``patchrec.persrec.layout`` cannot hide in both.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from patchrec.batching.row_roles import ITEM, PREFIX, RECENT, TOKEN


def persrec_mask(kind: np.ndarray, segment: np.ndarray) -> torch.Tensor:
    """[R, R] bool, True where row i may attend to row j, for one sequence of rows with roles ``kind``
    (PREFIX / ITEM / TOKEN / RECENT) and ``segment`` (the old segment of ITEM and TOKEN rows)."""
    kind = torch.as_tensor(np.asarray(kind))
    seg = torch.as_tensor(np.asarray(segment))
    n = len(kind)
    ki, kj = kind[:, None], kind[None, :]
    si, sj = seg[:, None], seg[None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    old_i = (ki == ITEM) | (ki == TOKEN)
    old_j = (kj == ITEM) | (kj == TOKEN)
    sees = (
        (kj == PREFIX)  # the shared prefix is visible to every later row
        | (old_i & old_j & (si == sj))  # a segment's rows see earlier rows of the same segment
        | (old_i & (kj == TOKEN) & (sj < si))  # ... and the T tokens of earlier segments
        | ((ki == RECENT) & ((kj == TOKEN) | (kj == RECENT)))  # recent rows: all T tokens, recent rows
    )
    return causal & sees


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_rows: np.ndarray,
    masks: list[torch.Tensor],
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of packed rows [R, H, D] (GQA: Hq a multiple of Hkv), sequence by sequence, with a
    dense [n, n] mask per sequence; a row that sees nothing gets 0. Computed in fp64."""
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs = []
    for s, mask in enumerate(masks):
        lo, hi = int(cu_rows[s]), int(cu_rows[s + 1])
        qs = q[lo:hi].double().transpose(0, 1)
        ks = k[lo:hi].double().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[lo:hi].double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def item_roles(n: int, segment: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Roles of the rows of one item sequence of ``n`` items, one row at a time (docs/method.md §6:
    full segments from the oldest item, the last 1..segment items recent)."""
    kind, seg = [], []
    old_segments = (n - 1) // segment
    for s in range(old_segments):
        kind += [ITEM] * segment + [TOKEN] * tokens
        seg += [s] * (segment + tokens)
    recent = n - old_segments * segment
    kind += [RECENT] * recent
    seg += [-1] * recent
    return np.array(kind), np.array(seg)


__all__ = ["ITEM", "PREFIX", "RECENT", "TOKEN", "item_roles", "masked_attention_reference", "persrec_mask"]
