"""PerSRec on the ID models: the packed forward against the dense-mask reference (outputs and gradients),
the cached per-user state against the full forward, and training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_data import tiny_dataset

from patchrec.baselines import HSTU, HSTUConfig, SASRec, SASRecConfig, TrainConfig, fit
from patchrec.baselines.train import cu_seqlens_of, sample_scorer
from patchrec.data.dataset import make_samples
from patchrec.persrec import item_rows
from patchrec.persrec.reference import item_roles, masked_attention_reference, persrec_mask
from patchrec.persrec.sequence import (
    CachedUser,
    PersrecConfig,
    cached_scorer,
    fold_segments,
    recent_hidden,
    split_history,
)

SEGMENT, TOKENS = 4, 3


def _sasrec(seed: int = 0, num_items: int = 37, **kw) -> SASRec:
    torch.manual_seed(seed)
    config = SASRecConfig(hidden=24, num_blocks=2, num_heads=2, dropout=0.0, max_len=40,
                          persrec_tokens=TOKENS, persrec_segment=SEGMENT, **kw)  # fmt: skip
    return SASRec(num_items, config).double()


def _hstu(seed: int = 0, num_items: int = 37) -> HSTU:
    torch.manual_seed(seed)
    config = HSTUConfig(hidden=24, num_blocks=2, num_heads=2, dropout=0.0, max_len=40,
                        persrec_tokens=TOKENS, persrec_segment=SEGMENT)  # fmt: skip
    return HSTU(num_items, config).double()


# The model-independent PerSRec behaviour (cache, folding, training the tokens), for both backbones; the
# forward-vs-dense-mask tests stay per model (SASRec here, HSTU in test_hstu.py).
BUILDERS = {"sasrec": _sasrec, "hstu": _hstu}


def _reference_hidden(model: SASRec, items: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """SASRec's layers with the explicit dense PerSRec mask per sequence instead of the block layout."""
    rows = item_rows(lengths, SEGMENT, TOKENS)
    masks = [persrec_mask(*item_roles(int(n), SEGMENT, TOKENS)) for n in lengths]
    x = model.embed_rows(items, rows)
    for block in model.blocks:
        q, k, v = block.qkv(block.attn_norm(x))
        out = masked_attention_reference(q, k, v, rows.cu_rows, masks)
        x = x + block.out_proj(out.reshape(x.shape))
        x = x + block.ffn(block.ffn_norm(x))
    return model.final_norm(x)[torch.from_numpy(rows.item_row)]


def test_sasrec_persrec_matches_dense_mask_reference():
    model = _sasrec()
    lengths = np.array([13, 1, 4, 5, 9, 17])  # 0..4 segments, ragged recent blocks
    g = torch.Generator().manual_seed(1)
    items = torch.randint(0, 37, (int(lengths.sum()),), generator=g)
    got = model(items, cu_seqlens_of(lengths), int(lengths.max()))
    want = _reference_hidden(model, items, lengths)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(got.shape, generator=g, dtype=got.dtype)
    names, params = zip(*model.named_parameters(), strict=True)
    got_g = torch.autograd.grad(got, params, grad)
    want_g = torch.autograd.grad(want, params, grad)
    for name, a, b in zip(names, got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert got_g[names.index("token_emb.weight")].abs().sum() > 0  # the T vectors are learned


@pytest.mark.parametrize("name", BUILDERS)
def test_cached_state_equals_full_forward(name):
    model = BUILDERS[name](seed=3).float().eval()
    samples = make_samples(tiny_dataset(seed=2, num_users=20, max_len=40), "train", 40)
    assert samples.history_lengths.max() > 2 * SEGMENT  # several old segments somewhere
    index = np.arange(len(samples))
    full = sample_scorer(model, samples)(index)
    cached = cached_scorer(model, samples)(index)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BUILDERS)
def test_incremental_folding_equals_one_fold(name):
    model = BUILDERS[name](seed=4).eval()
    g = torch.Generator().manual_seed(5)
    history = torch.randint(0, 37, (3 * SEGMENT + 2,), generator=g)
    lengths = np.array([len(history)])
    with torch.no_grad():
        full = model(history, cu_seqlens_of(lengths), len(history))[-1]
        old, recent = split_history(lengths, SEGMENT)
        assert old.tolist() == [3 * SEGMENT] and recent.tolist() == [2]
        state = None
        for s in range(3):  # one segment at a time, as new interactions arrive
            state = fold_segments(model, state, history[s * SEGMENT : (s + 1) * SEGMENT], np.array([SEGMENT]))
        assert state.rows().tolist() == [3 * TOKENS]
        # the state's rows keep their positions (HSTU's relative bias reads them): each segment's T rows
        want_pos = [s * (SEGMENT + TOKENS) + SEGMENT + t for s in range(3) for t in range(TOKENS)]
        assert state.positions.tolist() == want_pos
        assert state.nbytes().tolist() == [3 * TOKENS * 2 * 2 * 24 * 8]  # k rows x layers x (k, v) x d x fp64
        step = recent_hidden(model, state, history[3 * SEGMENT :], recent)[0]
    torch.testing.assert_close(step, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", BUILDERS)
def test_fit_trains_the_persrec_tokens(name):
    dataset = tiny_dataset(seed=1, num_users=16, max_len=30)
    model = BUILDERS[name](seed=6, num_items=dataset.num_items).float()
    before = model.token_emb.weight.detach().clone()
    fit(model, dataset, TrainConfig(epochs=1, batch_size=8, seed=0), max_len=30, progress=False)
    assert not torch.equal(model.token_emb.weight, before)


def test_persrec_bad_config_is_refused():
    with pytest.raises(ValueError, match="tokens"):
        PersrecConfig(tokens=-1)
    with pytest.raises(ValueError, match="segment"):
        PersrecConfig(tokens=2, segment=0)
    model = _sasrec().eval()
    state = fold_segments(model, None, torch.zeros(SEGMENT, dtype=torch.long), np.array([SEGMENT]))
    with pytest.raises(ValueError, match="recent items"):
        recent_hidden(model, state, torch.zeros(SEGMENT + 1, dtype=torch.long), np.array([SEGMENT + 1]))
    with pytest.raises(ValueError, match="without PerSRec"):
        plain = SASRec(5, SASRecConfig(hidden=8))
        fold_segments(plain, None, torch.zeros(2, dtype=torch.long), np.array([2]))


def test_baseline_command_cache_on_and_off_rank_alike(tmp_path):
    from patchrec.cli import main
    from patchrec.data.release import write_release

    torch.set_num_threads(1)
    data = str(write_release(tiny_dataset(seed=3, num_users=40, max_len=40), tmp_path / "tiny"))
    common = ["baseline", "sasrec", "--data", data, "--max-items", "30", "--epochs", "1", "--hidden", "16",
              "--persrec-tokens", "2", "--persrec-segment", "6", "--no-progress"]  # fmt: skip
    results = {}
    for cache in ("on", "off"):
        out = tmp_path / cache
        assert main([*common, "--persrec-cache", cache, "--latency-samples", "4", "--out", str(out)]) == 0
        results[cache] = json.loads((out / "results.json").read_text())
    on, off = results["on"], results["off"]
    assert on["config"]["persrec_cache"] is True and off["config"]["persrec_cache"] is False
    assert on["ranks"] == off["ranks"]
    assert on["latency"]["state_bytes_mean"] > 0 and "state_bytes_mean" not in off["latency"]
    # PerSRec flags without tokens, or on a model without attention, are errors
    bad = (["sasrec", "--persrec-segment", "5"], ["gru4rec", "--persrec-tokens", "2"])
    for flags in bad:
        assert main(["baseline", *flags, "--data", data, "--out", str(tmp_path / "bad")]) == 2


def test_cached_user_follows_the_full_forward_as_interactions_arrive():
    model = _sasrec(seed=8).eval()
    g = torch.Generator().manual_seed(9)
    history = torch.randint(0, 37, (3 * SEGMENT + 3,), generator=g)
    user = CachedUser(model, history[:2])
    seen = 2
    for step in (1, SEGMENT, 3, 2 * SEGMENT - 1, 2):  # single interactions and bursts crossing segments
        user.add(history[seen : seen + step].tolist())
        seen = min(seen + step, len(history))
        with torch.no_grad():
            full = model.logits(model(history[:seen], cu_seqlens_of(np.array([seen])), seen)[-1])
        torch.testing.assert_close(user.scores(), full, rtol=1e-10, atol=1e-10)
        assert 1 <= len(user.recent) <= SEGMENT
        assert user.state.rows()[0] == TOKENS * ((seen - 1) // SEGMENT)  # k rows per folded segment
    with pytest.raises(ValueError, match="no interactions"):
        CachedUser(model).scores()
    with pytest.raises(ValueError, match="ids in"):
        user.add([37])
