"""PerSRec's window layout (the paper's) and rolling layout (bounded state) on SASRec and HSTU: the packed
forward against dense references (the official code's masking rule on its padded slots; the recurrence
written out segment by segment), outputs and gradients; cached paths and ``CachedUser`` against the full
forward; the rolling state's size and horizon; truncated backpropagation; bad options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dense_reference import dense_hidden
from tiny_data import tiny_dataset

from patchrec.baselines import HSTU, HSTUConfig, SASRec, SASRecConfig, TrainConfig, fit
from patchrec.baselines.train import cu_seqlens_of, sample_scorer, training_windows
from patchrec.batching.persrec_layouts import PersrecConfig, window_split
from patchrec.data.dataset import gather_ragged, make_samples
from patchrec.persrec.rolling import rolling_hidden
from patchrec.persrec.sequence import CachedUser, cached_scorer
from patchrec.persrec.staleness import stale_scorer

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

NUM_ITEMS = 37
TOKENS, WINDOW, RECENT, SEGMENT = 3, 6, 4, 5
WINDOW_KW = dict(persrec_tokens=TOKENS, persrec_layout="window", persrec_window=WINDOW, persrec_recent=RECENT,
                 max_len=WINDOW + RECENT)  # fmt: skip
ROLLING_KW = dict(persrec_tokens=TOKENS, persrec_layout="rolling", persrec_segment=SEGMENT)


def build(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    common = dict(hidden=24, num_blocks=2, num_heads=2, dropout=0.0) | kw
    if name == "sasrec":
        return SASRec(NUM_ITEMS, SASRecConfig(**common)).double()
    return HSTU(NUM_ITEMS, HSTUConfig(**common)).double()


def assert_same_with_grads(model, got: torch.Tensor, want: torch.Tensor, seed: int, rtol=1e-10) -> dict:
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    got_g = torch.autograd.grad(got, params, grad, allow_unused=True)
    want_g = torch.autograd.grad(want, params, grad, allow_unused=True)
    for name, a, b in zip(names, got_g, want_g, strict=True):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=rtol, msg=name)
    return {n: g for n, g in zip(names, got_g, strict=True) if g is not None}


def item_rows_of(model, seq: torch.Tensor) -> torch.Tensor:
    return model.item_emb.weight[seq] * math.sqrt(model.config.hidden)


def official_window_reference(model, seq: torch.Tensor) -> torch.Tensor:
    """The window layout as facebookresearch/PerSRec's PersonalizedHSTU builds it: the sequence left-padded to
    P + R slots, k tokens inserted at slot P, positions = slot indices, mask = causal AND key not padding AND
    (rows from the recent segment on never see the old segment's slots). Hidden at the real item rows."""
    n = len(seq)
    total = WINDOW + RECENT
    slot_items = torch.full((total,), -1, dtype=torch.long)
    slot_items[total - n :] = seq
    slots = torch.cat([slot_items[:WINDOW], torch.full((TOKENS,), -2), slot_items[WINDOW:]])  # -2: a token
    rows = []
    garbage = torch.Generator().manual_seed(n)
    for s, item in enumerate(slots.tolist()):
        if item == -2:
            rows.append(model.token_emb.weight[(s - WINDOW) % TOKENS])
        elif item == -1:  # padding: masked as a key, so its value never matters
            rows.append(torch.randn(model.config.hidden, generator=garbage, dtype=torch.double))
        else:
            rows.append(item_rows_of(model, torch.tensor([item]))[0])
    x = torch.stack(rows)
    size = len(slots)
    mask = torch.ones(size, size, dtype=torch.bool).tril() & (slots != -1)[None, :]
    mask[WINDOW + TOKENS :, :WINDOW] = False  # item_segments: (0, P-1) and (P+k, end)
    hidden = dense_hidden(model, x, mask, torch.arange(size))
    return hidden[slots >= 0]


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_window_layout_matches_the_official_masking_rule(name):
    model = build(name, **WINDOW_KW)
    lengths = np.array([1, RECENT, RECENT + 1, 9, WINDOW + RECENT, 3, 7])  # empty, partial and full windows
    g = torch.Generator().manual_seed(1)
    items = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    got = model(items, cu_seqlens_of(lengths), int(lengths.max()))
    want = torch.cat([official_window_reference(model, seq) for seq in items.split(lengths.tolist())])
    grads = assert_same_with_grads(model, got, want, seed=2)
    assert grads["token_emb.weight"].abs().sum() > 0  # the T vectors are learned
    old, recent = window_split(lengths, model.persrec)
    assert recent.tolist() == [1, 4, 4, 4, 4, 3, 4] and old.tolist() == [0, 0, 1, 5, 6, 0, 3]


def rolling_reference(model, seq: torch.Tensor) -> torch.Tensor:
    """The rolling layout written out for one timeline: segment by segment, each as its own dense causal
    sequence [memory][items][tokens], the next memory = the output rows of the tokens."""
    k, n, d = TOKENS, SEGMENT, model.config.hidden
    memory = model.memory_emb.weight
    out = []
    segments = (len(seq) - 1) // n
    for j in range(segments + 1):
        chunk = seq[j * n : (j + 1) * n] if j < segments else seq[j * n :]
        fold = j < segments
        x = [memory, item_rows_of(model, chunk)] + ([model.token_emb.weight] if fold else [])
        x = torch.cat(x)
        positions = torch.cat([torch.arange(k), k + torch.arange(len(chunk))]
                              + ([k + n + torch.arange(k)] if fold else []))  # fmt: skip
        mask = torch.ones(len(x), len(x), dtype=torch.bool).tril()
        hidden = dense_hidden(model, x, mask, positions)
        out.append(hidden[k : k + len(chunk)])
        if fold:
            memory = hidden[-k:].reshape(k, d)
    return torch.cat(out)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_rolling_layout_matches_the_recurrence_written_out(name):
    model = build(name, **ROLLING_KW)
    lengths = np.array([1, SEGMENT, SEGMENT + 1, 23, 2 * SEGMENT, 4])  # 0..4 folded segments
    g = torch.Generator().manual_seed(3)
    items = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    got = model(items, cu_seqlens_of(lengths), int(lengths.max()))
    want = torch.cat([rolling_reference(model, seq) for seq in items.split(lengths.tolist())])
    grads = assert_same_with_grads(model, got, want, seed=4)
    assert grads["memory_emb.weight"].abs().sum() > 0 and grads["token_emb.weight"].abs().sum() > 0
    assert model.pos_emb.num_embeddings == 2 * TOKENS + SEGMENT  # positions never grow with the history


@pytest.mark.parametrize("layout", ["window", "rolling"])
@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_cached_scorer_equals_the_full_forward(name, layout):
    kw = WINDOW_KW if layout == "window" else ROLLING_KW
    model = build(name, seed=5, **kw).float().eval()
    dataset = tiny_dataset(seed=2, num_users=20, max_len=40)
    history = WINDOW + RECENT if layout == "window" else 40
    samples = make_samples(dataset, "train", history)
    assert samples.history_lengths.max() >= min(history, 2 * SEGMENT + 1)  # full windows / several segments
    index = np.arange(len(samples))
    full = sample_scorer(model, samples)(index)
    torch.testing.assert_close(cached_scorer(model, samples)(index), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_rolling_cached_user_over_ten_thousand_interactions(name):
    model = build(name, seed=6, persrec_tokens=2, persrec_layout="rolling", persrec_segment=50,
                  hidden=16).float().eval()  # fmt: skip
    g = torch.Generator().manual_seed(7)
    history = torch.randint(0, NUM_ITEMS, (10_007,), generator=g)
    one_by_one, bursts = CachedUser(model), CachedUser(model)
    state_bytes = 2 * 16 * 4  # k vectors of width d in fp32, whatever the history length
    checks = {1, 49, 50, 51, 101, 2_000, 10_007}
    burst_sizes = np.random.default_rng(8).integers(1, 40, size=2_000)
    cut = 0
    for seen in range(1, len(history) + 1):
        one_by_one.add([int(history[seen - 1])])
        while cut < seen:  # the burst user catches up in random chunks
            step = int(burst_sizes[cut % len(burst_sizes)])
            bursts.add(history[cut : cut + step].tolist())
            cut = min(cut + step, len(history))
        if seen in checks:
            with torch.no_grad():
                full = model.logits(model(history[:seen], cu_seqlens_of(np.array([seen])), seen)[-1])
            torch.testing.assert_close(one_by_one.scores(), full, rtol=1e-5, atol=1e-5)
            assert one_by_one.state_bytes == state_bytes and 1 <= one_by_one.num_items <= 50
        if cut == seen and seen in checks:
            torch.testing.assert_close(bursts.scores(), one_by_one.scores(), rtol=1e-5, atol=1e-5)
    assert bursts.state_bytes == state_bytes and one_by_one.state.folded.tolist() == [(10_007 - 1) // 50]


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_window_cached_user_refolds_every_m_interactions(name):
    model = build(name, seed=9, **WINDOW_KW).eval()
    g = torch.Generator().manual_seed(10)
    history = torch.randint(0, NUM_ITEMS, (40,), generator=g)

    def full_scores(upto: int) -> torch.Tensor:
        seq = history[max(0, upto - WINDOW - RECENT) : upto]
        with torch.no_grad():
            return model.logits(model(seq, cu_seqlens_of(np.array([len(seq)])), len(seq))[-1])

    exact, stale = CachedUser(model, history[:3]), CachedUser(model, history[:3], refold_every=5)
    built_at = 3
    for seen in range(4, len(history) + 1):
        exact.add([int(history[seen - 1])])
        stale.add([int(history[seen - 1])])
        torch.testing.assert_close(exact.scores(), full_scores(seen), rtol=1e-10, atol=1e-10)
        assert exact.state_bytes == TOKENS * 2 * 2 * 24 * 8  # k rows x layers x (k, v) x d x fp64
        if (seen - 3) % 5 == 0:
            built_at = seen
        # stale: the state of the window at the last refold, the recent block of now
        reference = CachedUser(model, history[max(0, built_at - WINDOW - RECENT) : built_at])
        reference.recent = history[max(0, seen - WINDOW - RECENT) : seen]
        torch.testing.assert_close(stale.scores(), reference.scores(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_rolling_memory_reaches_beyond_the_model_depth(name):
    # A path from an item j segments back to the recommendation exists iff the gradient of the scores with
    # respect to that item's embedding is non-zero: item NUM_ITEMS - 1 appears only in that segment.
    model = build(name, seed=11, **ROLLING_KW).eval()
    g = torch.Generator().manual_seed(12)
    for back in (1, 4, 8):  # 2 layers deep: a per-layer key/value carry would stop after 1
        history = torch.randint(0, NUM_ITEMS - 1, (8 * SEGMENT + 2,), generator=g)
        history[(8 - back) * SEGMENT + 2] = NUM_ITEMS - 1
        scores = model.logits(model(history, cu_seqlens_of(np.array([len(history)])), len(history))[-1])
        (grad,) = torch.autograd.grad(scores.sum(), model.item_emb.weight)
        assert grad[NUM_ITEMS - 1].abs().max() > 0, back
        assert grad[:-1].abs().max() > grad[NUM_ITEMS - 1].abs().max()  # older items weigh less at init


def test_rolling_truncated_backpropagation_cuts_the_gradient_only():
    lengths = np.array([3 * SEGMENT + 2])
    items = torch.randint(0, NUM_ITEMS, (int(lengths[0]),), generator=torch.Generator().manual_seed(13))
    grads, outs = {}, {}
    for unroll in (0, 1, 2):
        model = build("sasrec", seed=14, persrec_unroll=unroll, **ROLLING_KW).train()
        hidden = rolling_hidden(model, items, lengths)
        outs[unroll] = hidden.detach()
        hidden[-1].sum().backward()  # the open segment (the 4th) only
        grads[unroll] = model.memory_emb.weight.grad
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # forward values never depend on it
    assert grads[0].abs().sum() > 0  # through three memory hops back to the init
    assert grads[1] is None or grads[1].abs().sum() == 0  # cut after every segment
    assert grads[2] is None or grads[2].abs().sum() == 0  # cut after segment 2: the init is 3 hops back


@pytest.mark.parametrize("layout", ["window", "rolling"])
def test_fit_trains_every_layout(layout):
    kw = WINDOW_KW if layout == "window" else ROLLING_KW
    dataset = tiny_dataset(seed=1, num_users=16, max_len=30)
    torch.manual_seed(0)
    model = SASRec(dataset.num_items, SASRecConfig(hidden=16, dropout=0.0, **kw))
    history = WINDOW + RECENT if layout == "window" else int(np.diff(dataset.user_offsets).max())
    result = fit(model, dataset, TrainConfig(epochs=1, batch_size=8, seed=0), max_len=history, progress=False)
    assert result.epochs_run == 1 and np.isfinite(result.history[0]["loss"])
    # one step of the loop's loss: every PerSRec table gets a gradient
    windows = training_windows(dataset, history)
    flat = dataset.items.astype(np.int64)
    inputs = torch.from_numpy(gather_ragged(flat, windows.start, windows.length))
    targets = torch.from_numpy(gather_ragged(flat, windows.start + 1, windows.length))
    model.train()
    hidden = model(inputs, cu_seqlens_of(windows.length), int(windows.length.max()))
    torch.nn.functional.cross_entropy(model.logits(hidden), targets).backward()
    tables = ["item_emb", "pos_emb", "token_emb"] + (["memory_emb"] if layout == "rolling" else [])
    for name in tables:
        assert getattr(model, name).weight.grad.abs().sum() > 0, name


def test_bad_layout_options_are_refused():
    with pytest.raises(ValueError, match="layout"):
        PersrecConfig(tokens=2, layout="tree")
    with pytest.raises(ValueError, match="window"):
        PersrecConfig(tokens=2, layout="window", window=0, recent=3)
    with pytest.raises(ValueError, match="unroll"):
        PersrecConfig(tokens=2, layout="rolling", unroll=-1)
    with pytest.raises(ValueError, match="max_len"):
        SASRec(5, SASRecConfig(hidden=8, persrec_tokens=2, persrec_layout="window", persrec_window=4,
                               persrec_recent=2, max_len=10))  # fmt: skip
    model = build("sasrec", **WINDOW_KW)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(torch.zeros(11, dtype=torch.long), cu_seqlens_of(np.array([11])), 11)
    with pytest.raises(ValueError, match="refold_every"):
        CachedUser(model, refold_every=0)
    rolling = build("hstu", **ROLLING_KW)
    with pytest.raises(ValueError, match="refold applies"):
        CachedUser(rolling, [1, 2]).refold()


@pytest.mark.parametrize(
    "flags",
    [["--persrec-layout", "window", "--persrec-window", "8", "--persrec-recent", "5"],
     ["--persrec-layout", "rolling", "--persrec-segment", "6", "--persrec-unroll", "2"]],
    ids=["window", "rolling"],
)  # fmt: skip
def test_baseline_command_layouts_rank_alike_with_and_without_the_cache(flags, tmp_path):
    from patchrec.cli import main
    from patchrec.data.release import write_release

    data = str(write_release(tiny_dataset(seed=3, num_users=30, max_len=40), tmp_path / "tiny"))
    common = ["baseline", "hstu", "--data", data, "--epochs", "1", "--hidden", "16", "--persrec-tokens", "2",
              "--no-progress", *flags]  # fmt: skip
    results = {}
    for cache in ("on", "off"):
        out = tmp_path / cache
        assert main([*common, "--persrec-cache", cache, "--latency-samples", "3", "--out", str(out)]) == 0
        results[cache] = json.loads((out / "results.json").read_text())
    assert results["on"]["ranks"] == results["off"]["ranks"]
    config = results["on"]["config"]
    assert config["model_config"]["persrec_layout"] == flags[1]
    assert config["max_items"] == (13 if flags[1] == "window" else 40)  # P + R / the longest timeline


def test_baseline_command_refuses_mismatched_layout_flags(tmp_path, capsys):
    from patchrec.cli import main
    from patchrec.data.release import write_release

    data = str(write_release(tiny_dataset(seed=3, num_users=10, max_len=20), tmp_path / "tiny"))
    bad = {
        "need(s) --persrec-tokens": ["--persrec-layout", "rolling"],
        "needs --persrec-window P": ["--persrec-tokens", "2", "--persrec-layout", "window"],
        "P + R = 7": ["--persrec-tokens", "2", "--persrec-layout", "window", "--persrec-window", "4",
                      "--persrec-recent", "3", "--max-items", "9"],
        "whole timeline": ["--persrec-tokens", "2", "--persrec-layout", "rolling", "--max-items", "9"],
        "apply to --persrec-layout window": ["--persrec-tokens", "2", "--persrec-window", "4"],
        "applies to --persrec-layout rolling": ["--persrec-tokens", "2", "--persrec-unroll", "2"],
    }  # fmt: skip
    for message, flags in bad.items():
        assert main(["baseline", "sasrec", "--data", data, "--out", str(tmp_path / "x"), *flags]) == 2
        assert message in capsys.readouterr().err, message


@pytest.mark.parametrize("layout", ["window", "rolling"])
def test_stale_scorer_reads_an_old_state_with_the_current_recent_block(layout):
    kw = WINDOW_KW if layout == "window" else ROLLING_KW
    model = build("sasrec", seed=15, **kw).eval()
    dataset = tiny_dataset(seed=4, num_users=8, max_len=40)
    history = WINDOW + RECENT if layout == "window" else 40
    samples = make_samples(dataset, "train", history)
    index = np.arange(len(samples))
    fresh = cached_scorer(model, samples)(index)
    torch.testing.assert_close(stale_scorer(model, samples, 0)(index), fresh, rtol=1e-10, atol=1e-10)
    lag = 3
    stale = stale_scorer(model, samples, lag)(index)
    flat = torch.from_numpy(dataset.items.astype(np.int64))
    for i in index.tolist():
        base = int(dataset.user_offsets[samples.user[i]])
        target = int(samples.target_index[i])
        user = CachedUser(model, flat[base : max(base, target - lag)])  # the state as it was lag items ago
        if layout == "window":
            user.recent = flat[max(base, target - WINDOW - RECENT) : target]
        else:
            user.recent = flat[base + (target - base - 1) // SEGMENT * SEGMENT : target]
        torch.testing.assert_close(stale[i], user.scores(), rtol=1e-10, atol=1e-10)
    assert (stale - fresh).abs().amax(dim=1).gt(1e-6).any()  # staleness changes some recommendations
