"""Packer vs the slow reference: rows (through patch_embed's reference), labels, positions, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LLAMA3_TOKENIZER, shared_path
from tiny_data import build_tiny_tokenizer, tiny_dataset

import patchrec.batching.pack as pack_module
from patchrec.batching.pack import PackedBatch, iter_batches, pack_batch
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import make_planner, stack_plans
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec_kernels.reference.patch_embed import patch_embed_reference

MAX_ITEMS = 12  # < longest tiny history, so histories are truncated and PFT-S has sessions with remainders


@pytest.fixture(scope="module", params=["tiny", "llama3"])
def setup(request, tmp_path_factory):
    if request.param == "tiny":
        tok = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    else:
        shared_path("tokenizers", "llama3")
        tok = load_tokenizer(LLAMA3_TOKENIZER)
    ds = tiny_dataset(seed=3, num_users=9, max_len=30)
    td = tokenize_dataset(tok, ds)
    # min_position=1: histories of 1 and 2 items too (the release never has them, the packer must cope).
    samples = make_samples(ds, "train", max_items=MAX_ITEMS, min_position=1)
    # Random table over the whole (resized) vocabulary: never zeros, so a wrong id or mean shows up.
    weight = torch.randn(td.vocab_size, 8, generator=torch.Generator().manual_seed(0))
    return tok, td, samples, weight


def check_batch(batch: PackedBatch, tok, samples, weight, plans_of) -> None:
    """Every sequence of ``batch`` equals the reference built from ``plans_of(sample, view)``."""
    assert batch.token_ids.dtype == torch.int32 and batch.cu_seqlens.dtype == torch.int32
    assert batch.seg_offsets.dtype == torch.int64 and batch.row_offsets.dtype == torch.int64
    out = patch_embed_reference(weight, batch.token_ids, batch.seg_offsets, batch.row_offsets)
    reference = ReferencePacker(tok, weight)
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == batch.num_rows == out.shape[0]
    assert batch.max_seqlen == max(b - a for a, b in zip(cu, cu[1:], strict=False))
    for q in range(batch.num_sequences):
        sid, view = int(batch.sample_ids[q]), int(batch.view_ids[q])
        ref = reference.sequence(samples, sid, plans_of(sid, view))
        rows = out[cu[q] : cu[q + 1]]
        assert rows.shape == ref.rows.shape, (sid, view)
        torch.testing.assert_close(rows, ref.rows, rtol=1e-5, atol=1e-6)
        assert torch.equal(batch.position_ids[cu[q] : cu[q + 1]], torch.arange(cu[q + 1] - cu[q]))
        mine = batch.label_sample == q
        assert (batch.label_rows[mine] - cu[q]).tolist() == ref.label_rows
        assert batch.label_ids[mine].tolist() == ref.label_ids
        assert int(batch.hist_tokens_before[q]) == ref.hist_tokens_before
        assert int(batch.hist_tokens_after[q]) == ref.hist_tokens_after


@pytest.mark.parametrize("name,k,g", [("vanilla", 5, 5), ("pft-i", 5, 5), ("pft-i", 0, 5), ("pft-s", 5, 3),
                                      ("pft-s", 5, 1)])
def test_deterministic_plans_match_reference(setup, name, k, g):
    tok, td, samples, weight = setup
    planner = make_planner(name, k=k, g=g)
    seen = []
    for batch in iter_batches(samples, planner, td, max_rows=400):
        check_batch(batch, tok, samples, weight, lambda sid, view: planner.plan(len(samples.history(sid)))[0])
        seen += batch.sample_ids.tolist()
    assert seen == list(range(len(samples)))
    assert set(np.diff(samples.history_lengths)) != {0}  # the data really has varied lengths (n = 1 .. L)
    assert 1 in samples.history_lengths.tolist() and MAX_ITEMS in samples.history_lengths.tolist()


@pytest.mark.parametrize("name", ["pretrain", "dropout"])
def test_random_plans_match_reference(setup, name):
    """Plans drawn one sample at a time (mixed kinds in one history) packed by pack_batch."""
    tok, td, samples, weight = setup
    planner = make_planner(name, p=0.4)
    rng = np.random.default_rng(7)
    ids = np.arange(len(samples))
    per_sample = [planner.plan(len(samples.history(i)), rng) for i in ids]
    views = tuple(stack_plans([p[v] for p in per_sample], MAX_ITEMS) for v in range(planner.views))
    batch = pack_batch(samples, ids, views, td)
    assert batch.num_sequences == planner.views * len(ids)
    if planner.views == 2:  # both views of a sample side by side (pretrain and dropout)
        assert batch.sample_ids.tolist() == np.repeat(ids, 2).tolist()
        assert batch.view_ids.tolist() == [0, 1] * len(ids)
    check_batch(batch, tok, samples, weight, lambda sid, view: per_sample[sid][view])


@pytest.mark.parametrize("name,p,same_as", [("pretrain", 0.0, ("vanilla", 0)),
                                            ("pretrain", 1.0, ("pft-i", 0)),
                                            ("dropout", 0.0, ("vanilla", 0))])
def test_iter_batches_random_extremes(setup, name, p, same_as):
    """iter_batches' vectorised random path at p = 0 / 1 equals the deterministic plan it must reduce to."""
    tok, td, samples, weight = setup
    other = make_planner(same_as[0], k=same_as[1])
    for batch in iter_batches(samples, make_planner(name, p=p), td, max_rows=500, seed=3):
        check_batch(batch, tok, samples, weight,
                    lambda sid, view: (make_planner("vanilla") if view == 0 else other)
                    .plan(len(samples.history(sid)))[0])


def test_dropout_all_items_leaves_markers_only(setup):
    tok, td, samples, weight = setup
    (batch,) = list(iter_batches(samples, make_planner("dropout", p=1.0), td, max_rows=10**6))
    prompt = len(td.prompt.prefix) + len(td.prompt.suffix) + 2
    answers = td.titles.lengths[samples.targets()]
    # Two views per sample: all text first, then every item deleted (only the markers stay).
    dropped = batch.cu_seqlens.diff()[1::2]
    assert torch.equal(dropped, torch.from_numpy(prompt + answers).int())
    assert int(batch.hist_tokens_after[1::2].sum()) == 0
    assert torch.equal(batch.hist_tokens_after[0::2], batch.hist_tokens_before[0::2])


@pytest.mark.parametrize("name", ["pft-s", "pretrain"])
def test_token_budget_and_epoch_coverage(setup, monkeypatch, name):
    tok, td, samples, weight = setup
    monkeypatch.setattr(pack_module, "PLAN_CHUNK", 7)  # many chunk boundaries: carried-over partial batches
    planner = make_planner(name, g=3, p=0.5)
    # Budget just above the largest sample (for pretrain: both views all text, the most a sample can need).
    (vanilla,) = list(iter_batches(samples, make_planner("vanilla"), td, max_rows=10**7))
    budget = int(vanilla.cu_seqlens.diff().max()) * planner.views + 5
    for shuffle in (False, True):
        batches = list(iter_batches(samples, planner, td, max_rows=budget, shuffle=shuffle, seed=1))
        assert all(b.num_rows <= budget for b in batches)
        ids = torch.cat([b.sample_ids for b in batches]).reshape(-1, planner.views)
        assert torch.all(ids == ids[:, :1])  # views of a sample never split across batches
        order = ids[:, 0].tolist()
        assert sorted(order) == list(range(len(samples)))  # each sample exactly once
        assert (order == sorted(order)) != shuffle
        # Greedy: a batch ends only because the next sample would not fit.
        for b, nxt in zip(batches, batches[1:], strict=False):
            first = int(nxt.cu_seqlens[planner.views])
            assert b.num_rows + first > budget
        assert len(batches) > 3
    again = [b.sample_ids for b in iter_batches(samples, planner, td, max_rows=budget, shuffle=True, seed=1)]
    assert all(torch.equal(a, b.sample_ids) for a, b in zip(again, batches, strict=True))
    explicit = list(iter_batches(samples, planner, td, max_rows=budget, order=np.array([5, 2, 9])))
    assert torch.cat([b.sample_ids for b in explicit]).tolist()[:: planner.views] == [5, 2, 9]


def test_oversize_sample_is_an_error(setup):
    tok, td, samples, weight = setup
    planner = make_planner("vanilla")
    rows = next(iter(iter_batches(samples, planner, td, max_rows=10**7))).cu_seqlens.diff()
    big = int(rows.argmax())
    with pytest.raises(ValueError, match=f"sample {big} "):
        list(iter_batches(samples, planner, td, max_rows=int(rows.max()) - 1))
    with pytest.raises(ValueError, match="max_rows"):
        list(iter_batches(samples, planner, td, max_rows=0))


def test_prompt_only_packing(setup):
    tok, td, samples, weight = setup
    planner = make_planner("pft-i", k=2)
    full = next(iter(iter_batches(samples, planner, td, max_rows=10**7)))
    bare = next(iter(iter_batches(samples, planner, td, max_rows=10**7, answer=False)))
    answers = torch.from_numpy(td.titles.lengths[samples.targets()])
    assert torch.equal(full.cu_seqlens.diff() - bare.cu_seqlens.diff(), answers.int())
    assert bare.label_rows.numel() == 0


@pytest.mark.parametrize("name", ["pft-i", "pft-s"])
def test_real_release_first_batch_llama3(name):
    """Real titles (punctuation, unicode) and full 100-item histories: the first ML-100K test batch."""
    from patchrec.data.release import load_release

    ds = load_release(shared_path("data", "patchrec", "ml-100k"))
    shared_path("tokenizers", "llama3")
    tok = load_tokenizer(LLAMA3_TOKENIZER)
    td = tokenize_dataset(tok, ds)
    samples = make_samples(ds, "test", max_items=100)
    planner = make_planner(name, k=5, g=20)
    batch = next(iter(iter_batches(samples, planner, td, max_rows=3000, shuffle=True, seed=0)))
    assert batch.num_sequences >= 3 and batch.num_rows <= 3000
    weight = torch.randn(td.vocab_size, 4, generator=torch.Generator().manual_seed(1))
    check_batch(batch, tok, samples, weight, lambda sid, view: planner.plan(len(samples.history(sid)))[0])
