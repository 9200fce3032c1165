"""PerSRec's segment-isolated attention against the explicit dense mask (docs/method.md §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchrec.persrec import block_layout, block_state, item_rows, segmented_attention
from patchrec.persrec.reference import (
    ITEM,
    PREFIX,
    RECENT,
    TOKEN,
    item_roles,
    masked_attention_reference,
    persrec_mask,
)


def _qkv(rows: int, hq: int = 4, hkv: int = 2, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: (torch.randn(rows, h, d, generator=g, dtype=torch.float64) * 0.7).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def _check_parity(q, k, v, layout, cu_rows, masks):
    out = segmented_attention(q, k, v, layout)
    ref = masked_attention_reference(q, k, v, cu_rows, masks)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    return out


def test_mask_follows_method_rules():
    kind, seg = item_roles(4, 2, 2)  # one full old segment; the last 2 items recent
    assert kind.tolist() == [ITEM, ITEM, TOKEN, TOKEN, RECENT, RECENT]
    # seg 0: items 0,1 then T 2,3; seg 1: items 4,5 then T 6,7; recent 8
    kind, seg = item_roles(5, 2, 2)
    mask = persrec_mask(kind, seg)
    rows = {i: set(np.flatnonzero(mask[i].numpy()).tolist()) for i in range(len(kind))}
    assert rows[1] == {0, 1}  # an old item: its segment, causal
    assert rows[3] == {0, 1, 2, 3}  # T of segment 0 sees its segment
    assert rows[4] == {2, 3, 4}  # segment 1's first item: earlier T tokens and itself, not old items
    assert rows[7] == {2, 3, 4, 5, 6, 7}  # segment 1's second T: earlier T, its own segment
    assert rows[8] == {2, 3, 6, 7, 8}  # recent: all T tokens and itself


@pytest.mark.parametrize("segment,tokens", [(3, 2), (1, 1), (5, 4)])
def test_item_sequences_match_dense_mask(segment, tokens):
    lengths = np.array([7, 1, 12, 3, 10, 16])  # ragged: 0..3 segments, recent 1..segment items
    rows = item_rows(lengths, segment, tokens)
    masks = [persrec_mask(*item_roles(int(n), segment, tokens)) for n in lengths]
    assert [m.shape[0] for m in masks] == np.diff(rows.cu_rows).tolist()
    q, k, v = _qkv(rows.num_rows)
    _check_parity(q, k, v, rows.layout, rows.cu_rows, masks)


def test_prefix_blocks_match_dense_mask():
    # LLM-like sequences: a shared prefix, old segments of ragged rows each ending in T tokens, a final block
    tokens = 3
    seqs = [(4, [5, 2, 6], 7), (2, [], 3), (3, [9], 1)]  # (prefix rows, segment item rows, final rows)
    block_rows, carried, block_seq, masks, cu = [], [], [], [], [0]
    for s, (prefix, segs, final) in enumerate(seqs):
        kind, seg = [PREFIX] * prefix, [-1] * prefix
        block_rows.append(prefix), carried.append(prefix), block_seq.append(s)
        for i, n in enumerate(segs):
            kind += [ITEM] * n + [TOKEN] * tokens
            seg += [i] * (n + tokens)
            block_rows.append(n + tokens), carried.append(tokens), block_seq.append(s)
        kind += [RECENT] * final
        seg += [-1] * final
        block_rows.append(final), carried.append(0), block_seq.append(s)
        masks.append(persrec_mask(np.array(kind), np.array(seg)))
        cu.append(cu[-1] + len(kind))
    layout = block_layout(np.array(block_rows), np.array(carried), np.array(block_seq), len(seqs))
    q, k, v = _qkv(cu[-1], seed=1)
    _check_parity(q, k, v, layout, np.array(cu), masks)


def test_cached_state_gives_the_same_recent_outputs():
    segment, tokens = 4, 2
    lengths = np.array([9, 13, 2])
    full = item_rows(lengths, segment, tokens)
    q, k, v = _qkv(full.num_rows, seed=2)
    out = segmented_attention(q, k, v, full.layout)

    # The same rows split: old segments once (their state), then the recent block against the state.
    segs = (lengths - 1) // segment
    old = item_rows(segs[segs > 0] * segment, segment, tokens, final_block=False)
    recent_lengths = lengths - segs * segment
    rows_per_seq = np.diff(full.cu_rows)
    # a row is recent when it is among the last ``recent`` rows of its sequence
    is_recent = full.positions >= np.repeat(rows_per_seq - recent_lengths, rows_per_seq)
    old_rows, recent_rows = np.flatnonzero(~is_recent), np.flatnonzero(is_recent)
    assert len(old_rows) == old.num_rows and len(old_rows) + len(recent_rows) == rows_per_seq.sum()
    pick = lambda x, r: x[torch.as_tensor(r)]  # noqa: E731
    state_k = block_state(pick(k, old_rows), old.layout)
    state_v = block_state(pick(v, old_rows), old.layout)
    context = np.zeros(len(lengths), dtype=np.int64)
    context[segs > 0] = np.diff(old.layout.cu_state.numpy())
    assert context.tolist() == (segs * tokens).tolist()  # k rows per folded segment
    recent = item_rows(recent_lengths, segment, tokens, context_rows=context)
    got = segmented_attention(
        pick(q, recent_rows), pick(k, recent_rows), pick(v, recent_rows), recent.layout,
        context_k=state_k, context_v=state_v,
    )  # fmt: skip
    torch.testing.assert_close(got, pick(out, recent_rows), rtol=1e-12, atol=1e-12)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="segment"):
        item_rows(np.array([3]), 0, 2)
    with pytest.raises(ValueError, match="tokens"):
        item_rows(np.array([3]), 2, 0)
    with pytest.raises(ValueError, match=">= 1 item"):
        item_rows(np.array([3, 0]), 2, 1)
    with pytest.raises(ValueError, match="whole segments"):
        item_rows(np.array([5]), 2, 1, final_block=False)
    with pytest.raises(ValueError, match="carried_rows"):
        block_layout(np.array([2]), np.array([3]), np.array([0]), 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        block_layout(np.array([2, 2]), np.array([0, 0]), np.array([1, 0]), 2)
