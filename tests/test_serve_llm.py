"""``patchrec serve`` on LLM runs (tiny random-init Llama, tiny tokenizer and dataset): the plans vanilla,
PFT-I, PFT-S and persrec with their settings from the run's train_config.json, exact ranking equal to
``patchrec eval``'s scores of the same histories (persrec: equal to the whole-prompt scores too), stored
users equal to inline histories, batched requests equal to each alone, and beam ranking returning
``beam_search``'s titles."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from serve_helpers import build_app, running
from tiny_data import build_tiny_tokenizer, tiny_dataset

from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.data.release import write_release
from patchrec.eval.evaluate import exact_item_scores
from patchrec.eval.exact import CatalogTitles
from patchrec.model.decoder import PackedDecoder

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

MAX_ITEMS, K, G, SEGMENT, TOKENS, WINDOW, RECENT = 12, 2, 3, 3, 2, 6, 3
# run name -> (training stage, persrec layout options in its train_config.json)
RUNS = {
    "vanilla": ("vanilla", {}),
    "pft-i": ("pft-i", {}),
    "pft-s": ("pft-s", {}),
    "persrec": ("persrec", {"persrec_layout": "segments"}),
    "persrec-window": ("persrec", {"persrec_layout": "window", "persrec_window": WINDOW,
                                   "persrec_recent": RECENT, "max_items": WINDOW + RECENT}),
    "persrec-rolling": ("persrec", {"persrec_layout": "rolling"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run directory per plan (train_config.json + model/ with its tokenizer) on one dataset."""
    root = tmp_path_factory.mktemp("llm")
    tok_dir = build_tiny_tokenizer(root / "tok")
    dataset = tiny_dataset(seed=3, num_users=9, max_len=30)
    write_release(dataset, root / "data")
    out = {}
    for name, (stage, layout) in RUNS.items():
        tok = load_tokenizer(tok_dir)
        tokens = tokenize_dataset(tok, dataset, persrec_tokens=TOKENS if stage == "persrec" else 0)
        model = PackedDecoder.from_preset("tiny", tokens.vocab_size, seed=4)
        run = root / name
        model.save_pretrained(run / "model")
        tok.save_pretrained(str(run / "model"))
        saved = {"stage": stage, "k": K, "g": G, "max_items": MAX_ITEMS, "persrec_tokens": TOKENS,
                 "persrec_segment": SEGMENT, "persrec_old": "item", "val_plan": None,
                 "data": str(root / "data"), **layout}  # fmt: skip
        (run / "train_config.json").write_text(json.dumps(saved))
        out[name] = (run, model.eval(), tokens)
    return dataset, out


def serve_args(*argv: str):
    from patchrec.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def reference(dataset, model, tokens, name: str, index: np.ndarray, cache: str = "on") -> torch.Tensor:
    """``patchrec eval``'s exact scores of test samples (every title is one item here: no duplicates)."""
    samples = make_samples(dataset, "test", max_items_of(dataset, name))
    stage, layout = RUNS[name]
    options = {key.removeprefix("persrec_"): v for key, v in layout.items() if key.startswith("persrec_")}
    planner = make_planner(stage, k=K, g=G, segment=SEGMENT, tokens=TOKENS, **options)
    catalog = CatalogTitles.from_table(tokens.titles)
    with torch.inference_mode():
        return exact_item_scores(model, tokens, samples, index, catalog, planner=planner, max_rows=4096,
                                 persrec_cache=cache)  # fmt: skip


def max_items_of(dataset, name: str) -> int:
    """History items read: L (window: P + R), or the whole timeline (rolling), as patchrec eval reads."""
    if name == "persrec-rolling":
        return int(np.diff(dataset.user_offsets).max())
    return RUNS[name][1].get("max_items", MAX_ITEMS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_llm_plans_serve_eval_scores(runs, name, tmp_path):
    from patchrec.commands.serve import llm_scorer

    dataset, by_plan = runs
    run, model, tokens = by_plan[name]
    scorer, model_dir = llm_scorer(serve_args("--model", str(run)), torch.device("cpu"))
    stage, layout = RUNS[name]
    described = scorer.describe()
    assert described["plan"] == stage
    assert scorer.settings.max_items == RUNS[name][1].get("max_items", MAX_ITEMS)
    assert described.get("persrec", {}).get("layout") == layout.get("persrec_layout")
    samples = make_samples(dataset, "test", max_items_of(dataset, name))
    index = np.arange(min(len(samples), 4))
    assert len(index) >= 3
    want = reference(dataset, model, tokens, name, index)
    if stage == "persrec":  # the state path equals the whole prompt
        torch.testing.assert_close(want, reference(dataset, model, tokens, name, index, "off"), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    # the users' whole histories before the targets (some longer than L: the server reads the newest L items,
    # as the samples do)
    starts = dataset.user_offsets[samples.user[index]]
    ends = samples.target_index[index]
    full = [dataset.items[s:e].astype(np.int64) for s, e in zip(starts, ends, strict=True)]
    assert max(len(h) for h in full) > MAX_ITEMS
    app, _ = build_app(model_dir, tmp_path / "db.sqlite", scorer=scorer, batch_window_ms=100)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for i, h in enumerate(full):
                r = await client.post("/v1/events", json={"user": f"u{i}", "items": h.tolist()})
                assert r.status_code == 200, r.text
            inline = [{"history": h.tolist(), "k": 5, "exclude_seen": False} for h in full]
            stored = [{"users": [f"u{i}"], "k": 5, "exclude_seen": False} for i in range(len(full))]
            together = await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in inline + stored))
            alone = [await client.post("/v1/recommend", json=b) for b in inline]
            return [r.json() for r in together], [r.json() for r in alone]

    with running(app) as url:
        together, alone = asyncio.run(go(url))
    n = len(full)
    for row, got in enumerate(together[:n]):
        (result,) = got["results"]
        order = sorted(range(dataset.num_items), key=lambda i: (-float(want[row, i]), i))[:5]
        assert result["items"] == order, (name, row)
        np.testing.assert_allclose(result["scores"], want[row, order].numpy(), rtol=1e-5, atol=1e-4)
        assert result["titles"] == [dataset.titles[i] for i in order]
        assert together[n + row]["results"][0]["items"] == order  # a stored user = the inline history
        assert alone[row]["results"][0]["items"] == order
        np.testing.assert_allclose(alone[row]["results"][0]["scores"], result["scores"], rtol=1e-5, atol=1e-5)


def test_llm_beam_ranking_returns_beam_search_titles(runs, tmp_path):
    from patchrec.batching.pack import iter_batches
    from patchrec.commands.serve import llm_scorer
    from patchrec.eval.beam import TitleTrie, beam_search

    dataset, by_plan = runs
    run, model, tokens = by_plan["pft-i"]
    args = serve_args("--model", str(run), "--ranking", "beam", "--beams", "4", "--groups", "2")
    scorer, model_dir = llm_scorer(args, torch.device("cpu"))
    samples = make_samples(dataset, "test", MAX_ITEMS).select(np.arange(2))
    catalog = CatalogTitles.from_table(tokens.titles)
    planner = make_planner("pft-i", k=K)
    with torch.inference_mode():
        (batch,) = list(iter_batches(samples, planner, tokens, 4096, answer=False))
        returned = beam_search(model, batch, TitleTrie(catalog, tokens.prompt.eot), beams=4, groups=2)
    app, _ = build_app(model_dir, tmp_path / "db.sqlite", scorer=scorer)
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        for sid, row in zip(batch.sample_ids.tolist(), returned, strict=True):
            history = samples.history(sid).tolist()
            body = {"history": history, "k": 4, "exclude_seen": False}
            got = client.post("/v1/recommend", json=body).json()
            titles = list(dict.fromkeys(int(catalog.canonical[u]) for u, _ in row if u >= 0))
            assert got["results"][0]["items"] == titles
            too_many = client.post("/v1/recommend", json={"history": history, "k": 5})
            assert too_many.status_code == 422 and too_many.json()["error"] == "k: must be in [1, 4], got 5"


def test_llm_rolling_memory_is_stored_folded_and_served(runs, tmp_path):
    # The persrec rolling run keeps each user's memory (k x d) in the storage: interactions fold completed
    # segments into it, a request reads only the open segment against it, and the scores equal patchrec
    # eval's whole-timeline forward.
    from patchrec.commands.serve import llm_scorer

    dataset, by_plan = runs
    run, model, tokens = by_plan["persrec-rolling"]
    scorer, model_dir = llm_scorer(serve_args("--model", str(run)), torch.device("cpu"))
    assert scorer.stateful and scorer.describe()["persrec"]["state"] == "stored memory"
    samples = make_samples(dataset, "test", max_items_of(dataset, "persrec-rolling"))
    sid = int(np.argmax(samples.history_lengths))
    history = samples.history(sid).astype(np.int64)
    assert len(history) > 3 * SEGMENT
    want = reference(dataset, model, tokens, "persrec-rolling", np.array([sid]))[0]
    app, _ = build_app(model_dir, tmp_path / "db.sqlite", scorer=scorer)
    memory_bytes = TOKENS * model.config.hidden_size * 4
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(history), 2):  # two interactions at a time
            r = client.post("/v1/events", json={"user": "u", "items": history[start : start + 2].tolist()})
            assert r.status_code == 200, r.text
            state = client.get("/v1/users/u").json()["state"]
            assert state is None or state["tensor_bytes"] == memory_bytes  # constant, whatever the history
        state = client.get("/v1/users/u").json()["state"]
        assert state["covered_items"] == (len(history) - 1) // SEGMENT * SEGMENT and state["current"]
        got = client.post("/v1/recommend", json={"users": ["u"], "k": 5, "exclude_seen": False}).json()
    order = sorted(range(dataset.num_items), key=lambda i: (-float(want[i]), i))[:5]
    assert got["results"][0]["items"] == order
    np.testing.assert_allclose(got["results"][0]["scores"], want[order].numpy(), rtol=1e-5, atol=1e-4)
