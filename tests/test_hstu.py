"""HSTU: the packed model against a plain dense per-sequence implementation (with and without PerSRec,
outputs and gradients), the cached PerSRec state against the full forward, training, and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_reference import hstu_dense_hidden
from transformers import set_seed

from patchrec.baselines import HSTU, HSTUConfig, Popularity, TrainConfig, evaluate, fit
from patchrec.baselines.hstu import pointwise_attention
from patchrec.baselines.train import cu_seqlens_of
from patchrec.data.dataset import make_samples
from patchrec.data.synthetic import make_synthetic
from patchrec.eval.metrics import rank_samples, ranking_metrics
from patchrec.persrec import block_layout
from patchrec.persrec.reference import ITEM, RECENT, TOKEN, item_roles, persrec_mask

# small ops, many steps: one intra-op thread (two stall behind other processes on a shared 2-core machine)
pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

NUM_ITEMS = 37
SEGMENT, TOKENS = 4, 3


def _hstu(seed: int = 0, num_items: int = NUM_ITEMS, **kw) -> HSTU:
    torch.manual_seed(seed)
    config = dict(hidden=24, num_blocks=2, num_heads=2, dropout=0.0, max_len=40) | kw
    return HSTU(num_items, HSTUConfig(**config)).double()


def _dense_logits(model: HSTU, hidden: torch.Tensor) -> torch.Tensor:
    return hidden @ F.normalize(model.item_emb.weight, dim=-1, eps=1e-6).T / model.config.temperature


def _assert_same_with_grads(model: HSTU, got: torch.Tensor, want: torch.Tensor, seed: int) -> dict:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    names, params = zip(*model.named_parameters(), strict=True)
    got_g = torch.autograd.grad(got, params, grad)
    want_g = torch.autograd.grad(want, params, grad)
    for name, a, b in zip(names, got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    return dict(zip(names, got_g, strict=True))


@pytest.mark.parametrize(
    "kw",
    [{}, {"position_buckets": 8, "attention_dim": 5, "linear_dim": 7, "num_heads": 3}],
    ids=["exact", "bucketed"],
)
def test_packed_hstu_equals_dense_per_sequence(kw):
    model = _hstu(**kw)
    lengths = np.array([1, 5, 17, 3, 40, 12])  # odd sizes, a one-item sequence and a full one
    g = torch.Generator().manual_seed(1)
    items = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    got = model.logits(model(items, cu_seqlens_of(lengths), int(lengths.max())))
    want = []
    for seq in items.split(lengths.tolist()):
        n = len(seq)
        x = model.item_emb(seq) * math.sqrt(model.config.hidden)
        want.append(
            _dense_logits(model, hstu_dense_hidden(model, x, torch.ones(n, n, dtype=torch.double).tril()))
        )
    grads = _assert_same_with_grads(model, got, torch.cat(want), seed=2)
    assert grads["layers.0.rel_bias"].abs().sum() > 0  # the relative bias is learned


def test_persrec_hstu_equals_dense_mask_reference():
    model = _hstu(persrec_tokens=TOKENS, persrec_segment=SEGMENT)
    lengths = np.array([13, 1, 4, 5, 9, 17])  # 0..4 segments, ragged recent blocks
    g = torch.Generator().manual_seed(1)
    items = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    got = model(items, cu_seqlens_of(lengths), int(lengths.max()))
    want = []
    for seq in items.split(lengths.tolist()):
        kind, segment = item_roles(len(seq), SEGMENT, TOKENS)
        # the rows written out one at a time: items (scaled) in order, T vector t after its segment's items
        rows, next_item, slot = [], 0, 0
        for role in kind:
            if role == TOKEN:
                rows.append(model.token_emb.weight[slot])
                slot = (slot + 1) % TOKENS
            else:
                assert role in (ITEM, RECENT)
                rows.append(model.item_emb.weight[seq[next_item]] * math.sqrt(model.config.hidden))
                next_item += 1
        mask = persrec_mask(kind, segment).double()
        hidden = hstu_dense_hidden(model, torch.stack(rows), mask)
        want.append(hidden[torch.from_numpy(kind != TOKEN)])
    grads = _assert_same_with_grads(model, got, torch.cat(want), seed=3)
    assert grads["token_emb.weight"].abs().sum() > 0  # the T vectors are learned


@pytest.mark.slow
def test_hstu_beats_popularity():
    # the topical dataset of tests/test_baselines.py::test_sequence_models_beat_popularity
    topical = make_synthetic(
        num_users=400, num_items=200, mean_length=40, seed=0, num_topics=10, long_term_share=0.0,
        drift_length=30.0,
    )  # fmt: skip
    test = make_samples(topical, "test", 50)
    pop_hr10 = ranking_metrics(rank_samples(Popularity.fit(topical).scorer(test), test), (10,))["HR@10"]
    set_seed(0)
    model = HSTU(topical.num_items, HSTUConfig(hidden=32, dropout=0.1, max_len=50))
    config = TrainConfig(epochs=4, batch_size=64, lr=3e-3, patience=4, seed=0)
    result = fit(model, topical, config, max_len=50, progress=False)
    assert result.best_epoch >= 1  # training improved on the untrained model
    hr10 = ranking_metrics(evaluate(model, test), (10,))["HR@10"]
    assert hr10 > pop_hr10 + 0.15, (hr10, pop_hr10)


def test_hstu_rejects_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        HSTU(NUM_ITEMS, HSTUConfig(hidden=10, num_heads=3))
    HSTU(NUM_ITEMS, HSTUConfig(hidden=10, num_heads=3, attention_dim=4, linear_dim=4))  # explicit dims: fine
    with pytest.raises(ValueError, match="linear_dim"):
        HSTU(NUM_ITEMS, HSTUConfig(attention_dim=8, linear_dim=16, persrec_tokens=2))
    with pytest.raises(ValueError, match="position_buckets"):
        HSTU(NUM_ITEMS, HSTUConfig(position_buckets=-1))
    with pytest.raises(ValueError, match="temperature"):
        HSTU(NUM_ITEMS, HSTUConfig(temperature=-1.0))
    with pytest.raises(ValueError, match="num_items"):
        HSTU(0)
    model = HSTU(NUM_ITEMS, HSTUConfig(hidden=8, max_len=4))
    with pytest.raises(ValueError, match="max_seqlen"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens_of(np.array([5])), 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens_of(np.array([3])), 3)
    with pytest.raises(ValueError, match="items"):
        model(torch.zeros(1, 3, dtype=torch.long), cu_seqlens_of(np.array([3])), 3)
    layout = block_layout(np.array([3]), np.array([0]), np.array([0]), 1)
    q = torch.zeros(3, 1, 4)
    pos = torch.arange(3)
    with pytest.raises(ValueError, match="context_k, context_v and context_positions"):
        pointwise_attention(q, q, q, layout, pos, scale=1.0, context_k=q, context_v=q)
    with pytest.raises(ValueError, match="positions"):
        pointwise_attention(q, q, q, layout, pos[:2], scale=1.0)
    with pytest.raises(ValueError, match="k must match q"):
        pointwise_attention(q, q[:, :, :2], q, layout, pos, scale=1.0)
    with pytest.raises(ValueError, match="layout"):
        pointwise_attention(q[:2], q[:2], q[:2], layout, pos[:2], scale=1.0)
