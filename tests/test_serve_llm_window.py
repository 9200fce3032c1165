"""``patchrec serve`` on an LLM persrec run with the window layout (the paper's): each user's state (the
prompt prefix's and the k T rows' keys/values) is stored, refolded every m interactions, and a request reads
only the current recent block against it (tiny random-init Llama, tiny tokenizer and catalog).

- m = 1: the served scores equal ``patchrec eval``'s forward over the newest P + R items (no stored state),
  for several users whose events arrive a few at a time; batched requests equal each alone;
- m > 1: between refolds the scores are those of the staleness rule, computed directly as the window prompt
  made of the old window at the last refold followed by the current recent block; the state is rebuilt
  exactly when m interactions have arrived;
- the stored state's size does not depend on the history length; a state made by another model, from other
  items or unreadable is rebuilt; beam ranking from a stored state returns ``beam_search``'s titles."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from serve_helpers import build_app, running
from tiny_data import build_tiny_tokenizer, tiny_dataset

from patchrec.batching.pack import Packer, iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import history_samples
from patchrec.data.release import write_release
from patchrec.eval.beam import TitleTrie, beam_search
from patchrec.eval.evaluate import exact_item_scores
from patchrec.eval.exact import CatalogTitles
from patchrec.model.decoder import PackedDecoder
from patchrec.serve.scorers import Query

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

TOKENS, WINDOW, RECENT = 2, 6, 3
CHUNKS = [1, 2, 1, 3, 1, 1, 2, 1, 2, 3, 1]  # events per request: 18 items in all


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A persrec run (window layout) directory, its model and tokenisation, and three users' histories."""
    root = tmp_path_factory.mktemp("llm-window")
    tok_dir = build_tiny_tokenizer(root / "tok")
    dataset = tiny_dataset(seed=3, num_users=9, max_len=30)
    write_release(dataset, root / "data")
    tok = load_tokenizer(tok_dir)
    tokens = tokenize_dataset(tok, dataset, persrec_tokens=TOKENS)
    model = PackedDecoder.from_preset("tiny", tokens.vocab_size, seed=4)
    out = root / "persrec-window"
    model.save_pretrained(out / "model")
    tok.save_pretrained(str(out / "model"))
    saved = {"stage": "persrec", "max_items": WINDOW + RECENT, "persrec_tokens": TOKENS, "persrec_segment": 3,
             "persrec_old": "item", "persrec_layout": "window", "persrec_window": WINDOW,
             "persrec_recent": RECENT, "val_plan": None, "data": str(root / "data")}  # fmt: skip
    (out / "train_config.json").write_text(json.dumps(saved))
    rng = np.random.default_rng(7)
    histories = [rng.integers(0, dataset.num_items, sum(CHUNKS)).astype(np.int64) for _ in range(3)]
    return out, dataset, model.eval(), tokens, histories


def scorer_of(run_dir, *flags):
    from patchrec.cli import build_parser
    from patchrec.commands.serve import llm_scorer

    args = build_parser().parse_args(["serve", "--model", str(run_dir), *flags])
    return llm_scorer(args, torch.device("cpu"))[0]


def eval_scores(dataset, model, tokens, histories, cache: str = "on") -> torch.Tensor:
    """``patchrec eval``'s exact scores of window-layout prompts of ``histories`` (their newest P + R items),
    built from the prompts alone (no stored state)."""
    planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT)
    samples = history_samples(dataset, [h[-(WINDOW + RECENT) :] for h in histories])
    catalog = CatalogTitles.from_table(tokens.titles)
    with torch.inference_mode():
        return exact_item_scores(model, tokens, samples, np.arange(len(histories)), catalog, planner=planner,
                                 max_rows=4096, persrec_cache=cache)  # fmt: skip


def state_bytes(model, tokens) -> int:
    """fp32 bytes of a window state: the prompt prefix rows and the k T rows, keys and values per layer."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    row = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    return (Packer(tokens).head_len + TOKENS) * row


def test_llm_window_state_is_stored_and_served_as_eval_scores(run, tmp_path):
    run_dir, dataset, model, tokens, histories = run
    scorer = scorer_of(run_dir, "--refold-every", "1")
    assert scorer.stateful and scorer.describe()["persrec"]["state"] == "stored state"
    app, _ = build_app(run_dir, tmp_path / "db.sqlite", scorer=scorer, batch_window_ms=50, refold_every=1)
    users = [f"u{i}" for i in range(len(histories))]
    everything = {"k": dataset.num_items, "exclude_seen": False}
    sizes = set()
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        at = 0
        for chunk in CHUNKS:  # every user gets a few events, then all are asked for at once and alone
            for user, h in zip(users, histories, strict=True):
                r = client.post("/v1/events", json={"user": user, "items": h[at : at + chunk].tolist()})
                assert r.status_code == 200, r.text
            at += chunk
            now = [h[:at] for h in histories]
            want = eval_scores(dataset, model, tokens, now)
            together = client.post("/v1/recommend", json={"users": users, **everything}).json()["results"]
            for i, user in enumerate(users):
                alone = client.post("/v1/recommend", json={"users": [user], **everything}).json()["results"]
                for result in (together[i], alone[0]):
                    got = torch.full((dataset.num_items,), -torch.inf)
                    got[result["items"]] = torch.tensor(result["scores"])
                    torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-5)
                state = client.get(f"/v1/users/{user}").json()["state"]
                assert state["current"] and state["covered_items"] == max(0, min(at, 9) - RECENT)
                sizes.add(state["tensor_bytes"])
    # the state is the same size whatever the history (1..18 items here)
    assert sizes == {state_bytes(model, tokens)}
    # the state path equals the whole prompt in one pass too
    torch.testing.assert_close(want, eval_scores(dataset, model, tokens, now, "off"), rtol=1e-4, atol=1e-4)


def stale_reference(dataset, model, tokens, history: np.ndarray, built_at: int) -> torch.Tensor:
    """The staleness rule, computed directly: the window prompt of the old window as it was when the state
    was built (history length ``built_at``) followed by the current recent block, without a stored state."""
    then = history[:built_at][-(WINDOW + RECENT) :]
    old_then = then[: len(then) - min(len(then), RECENT)]
    recent_now = history[len(history) - min(len(history), RECENT) :]
    return eval_scores(dataset, model, tokens, [np.concatenate([old_then, recent_now])])[0]


def test_llm_window_state_refolds_every_m_and_reads_stale_in_between(run):
    run_dir, dataset, model, tokens, histories = run
    m = 3
    scorer = scorer_of(run_dir, "--refold-every", str(m))
    assert scorer.describe()["persrec"]["refold_every"] == m
    stored = [None] * len(histories)
    at, stale_differs, rebuilt = 0, 0, 0
    for chunk in CHUNKS:
        at += chunk
        queries = [Query(h[:at], row) for h, row in zip(histories, stored, strict=True)]
        changed = scorer.maintain(queries)  # what the server runs after the events are acknowledged
        for i, (row, new) in enumerate(zip(stored, changed, strict=True)):
            due = row is None or at - row.built_at >= m
            assert (new is not None) == due, (i, at)
            if new is not None:
                assert new.built_at == at and new.fingerprint == scorer.fingerprint
                stored[i], rebuilt = new, rebuilt + 1
        queries = [Query(h[:at], row) for h, row in zip(histories, stored, strict=True)]
        together = scorer.score(queries)
        assert all(s.state is None for s in together)  # fresh enough: read, not rebuilt
        for i, q in enumerate(queries):
            want = stale_reference(dataset, model, tokens, q.history, stored[i].built_at)
            torch.testing.assert_close(together[i].scores, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(scorer.score([q])[0].scores, together[i].scores, rtol=1e-5, atol=1e-5)
            fresh = eval_scores(dataset, model, tokens, [q.history])[0]
            stale_differs += int(not torch.allclose(fresh, want, atol=1e-3))
        assert {row.tensor_bytes for row in stored} == {state_bytes(model, tokens)}
    assert stale_differs > 0  # the stale reads are not the fresh scores: the check above is not vacuous
    assert len(histories) < rebuilt < len(histories) * len(CHUNKS)


def same_state(a: bytes, b: bytes) -> bool:
    a, b = load_tensors(a), load_tensors(b)
    return a.keys() == b.keys() and all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_llm_window_state_of_another_model_or_items_is_rebuilt(run):
    run_dir, dataset, model, tokens, histories = run
    scorer = scorer_of(run_dir, "--refold-every", "5")
    history = histories[0][:14]
    (row,) = scorer.maintain([Query(history)])
    assert row is not None and (row.start, row.end) == (14 - WINDOW - RECENT, 14 - RECENT)
    want = eval_scores(dataset, model, tokens, [history])[0]
    bad = {
        "another model": dataclasses.replace(row, fingerprint="0" * 64),
        "other items": dataclasses.replace(row, items_hash="0" * 64),
        "unreadable": dataclasses.replace(row, data=b"not safetensors"),
        "too old": dataclasses.replace(row, built_at=9),
    }
    for why, stale in bad.items():
        (scored,) = scorer.score([Query(history, stale)])
        assert scored.state is not None, why
        assert scored.state.fingerprint == scorer.fingerprint and scored.state.built_at == 14, why
        assert same_state(scored.state.data, row.data), why  # the same state, built again
        torch.testing.assert_close(scored.scores, want, rtol=1e-5, atol=1e-5)
    # a state of another model that happens to look valid is not read: its scores would differ
    other = PackedDecoder.from_preset("tiny", tokens.vocab_size, seed=5).eval()
    scorer.windows.model = other
    (foreign,) = scorer.maintain([Query(history)])
    scorer.windows.model = model
    assert not same_state(foreign.data, row.data)
    (scored,) = scorer.score([Query(history, dataclasses.replace(foreign, fingerprint="f" * 64))])
    assert scored.state is not None and same_state(scored.state.data, row.data)
    torch.testing.assert_close(scored.scores, want, rtol=1e-5, atol=1e-5)


def test_llm_window_beam_ranking_from_stored_state(run):
    run_dir, dataset, model, tokens, histories = run
    scorer = scorer_of(run_dir, "--ranking", "beam", "--beams", "4", "--groups", "2", "--refold-every", "1")
    queries = [Query(h[:n]) for h, n in zip(histories, (4, 11, 18), strict=True)]
    rows = scorer.maintain(queries)
    queries = [Query(q.history, row) for q, row in zip(queries, rows, strict=True)]
    scored = scorer.score(queries)
    assert all(s.state is None for s in scored)
    planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT)
    samples = history_samples(dataset, [q.history[-(WINDOW + RECENT) :] for q in queries])
    catalog = CatalogTitles.from_table(tokens.titles)
    with torch.inference_mode():
        (batch,) = list(iter_batches(samples, planner, tokens, 4096, answer=False))
        returned = beam_search(model, batch, TitleTrie(catalog, tokens.prompt.eot), beams=4, groups=2)
    for sid, row in zip(batch.sample_ids.tolist(), returned, strict=True):
        want = torch.full((dataset.num_items,), -torch.inf)
        for title, value in reversed(row):
            if title >= 0:
                want[int(catalog.canonical[title])] = float(value)
        assert torch.isfinite(want).sum() >= 2
        torch.testing.assert_close(scored[sid].scores, want, rtol=1e-5, atol=1e-5)


def test_encode_with_state_reads_a_given_state_as_the_prompt_would(run):
    # The eval hook the server uses: a final block read against a state given from outside equals the
    # prompt's own cached pass, also when the prompt holds only the recent block (what a request packs)
    # and when the states are selected / reordered from a larger batched state.
    from patchrec.eval.exact import encode_prompts
    from patchrec.persrec.llm import encode_cached, encode_with_state, split_state
    from patchrec.persrec.stored import concat_states, split_states

    _, dataset, model, tokens, histories = run
    planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT)
    prompts = [h[:n][-(WINDOW + RECENT) :] for h, n in zip(histories, (2, 7, 15), strict=True)]
    with torch.inference_mode():
        (full,) = list(iter_batches(history_samples(dataset, prompts), planner, tokens, 4096, answer=False))
        recent = [p[len(p) - min(len(p), RECENT) :] for p in prompts]
        (short,) = list(iter_batches(history_samples(dataset, recent), planner, tokens, 4096, answer=False))
        state, *_ = split_state(model, full)
        want = encode_cached(model, full)
        for batch in (full, short):
            got = encode_with_state(model, batch, state)
            torch.testing.assert_close(got.first_logprobs, want.first_logprobs, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.lengths.cpu(), want.lengths.cpu())
        order = np.array([2, 0, 1])
        picked = state.select(order)
        rebuilt = concat_states([split_states(state)[i] for i in order])
        assert np.array_equal(picked.cu_state, rebuilt.cu_state)
        assert np.array_equal(picked.next_position, rebuilt.next_position)
        for a, b in zip(picked.keys + picked.values, rebuilt.keys + rebuilt.values, strict=True):
            assert torch.equal(a, b)
        one = next(iter(iter_batches(history_samples(dataset, [recent[2]]), planner, tokens, 4096,
                                     answer=False)))  # fmt: skip
        alone = encode_with_state(model, one, state.select([2]))
        torch.testing.assert_close(alone.first_logprobs[0], want.first_logprobs[2], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="state has 1 users, the batch 3 sequences"):
            encode_with_state(model, full, state.select([0]))
        with pytest.raises(ValueError, match="users must be indices"):
            state.select([3])
        vanilla = next(iter(iter_batches(history_samples(dataset, prompts), make_planner("vanilla"), tokens,
                                         4096, answer=False)))  # fmt: skip
        with pytest.raises(ValueError, match="state applies to the persrec plan"):
            encode_prompts(model, vanilla, state=state)
