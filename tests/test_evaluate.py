"""Whole-catalog evaluation: the prefix-cached exact scores against one plain transformers forward per
(sample, title), duplicate titles, the trie-constrained (diverse) beam search against brute force, history
masking, and the ``patchrec eval`` command on a tiny saved model."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny_data import build_tiny_tokenizer, tiny_dataset
from transformers import LlamaForCausalLM

from patchrec.batching.pack import iter_batches
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.eval.beam import PROTOCOLS, TitleTrie, beam_search
from patchrec.eval.evaluate import evaluate, exact_item_scores, limit_samples, rank_in_returned
from patchrec.eval.exact import CatalogTitles, encode_prompts, score_titles
from patchrec.eval.metrics import full_ranks, rank_samples
from patchrec.model.decoder import PackedLlama

DUP_OF, DUP = 3, 6  # item 6 ("Babe") is renamed to item 3's title ("Heat"): one title, two items


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok = load_tokenizer(tok_dir)
    ds = tiny_dataset(seed=7, num_users=8, max_len=24)
    titles = list(ds.titles)
    titles[DUP] = titles[DUP_OF]
    ds = dataclasses.replace(ds, titles=titles)
    td = tokenize_dataset(tok, ds)
    samples = make_samples(ds, "train", max_items=12)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=4).eval()
    # Tiny matmuls on a shared 2-core machine: one thread avoids oversubscription (measured ~10x faster).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tok, tok_dir, ds, td, samples, model
    torch.set_num_threads(threads)


def reference_title_scores(tok, model, samples, sample_ids, planner, catalog, eot):
    """One ordinary eager forward of [prompt rows ++ title tokens] per (sample, distinct title)."""
    reference = LlamaForCausalLM(copy.deepcopy(model.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("eager")
    reference.eval()
    weight = reference.get_input_embeddings().weight
    packer = ReferencePacker(tok, weight)
    out = torch.empty(len(sample_ids), len(catalog), dtype=torch.float64)
    with torch.no_grad():
        for r, sid in enumerate(sample_ids):
            plan = planner.plan(len(samples.history(sid)))[0]
            seq = packer.sequence(samples, sid, plan)
            prompt = seq.rows[: seq.label_rows[0] + 1]  # everything before the answer
            for u in range(len(catalog)):
                title = [int(t) for t in catalog.title(u)]
                rows = torch.cat([prompt, weight[title].float()])
                logits = reference(inputs_embeds=rows[None]).logits[0].double()
                logp = torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)
                labels = title + [eot]
                out[r, u] = logp[torch.arange(len(labels)), torch.tensor(labels)].sum()
    return out


@pytest.mark.parametrize("plan", ["vanilla", "pft-s"])
def test_exact_scores_match_one_forward_per_title(setup, plan):
    tok, _, ds, td, samples, model = setup
    planner = make_planner(plan, k=2, g=2)
    catalog = CatalogTitles.from_table(td.titles)
    assert len(catalog) == ds.num_items - 1  # the duplicate collapsed
    ids = np.argsort(-samples.history_lengths, kind="stable")[:3]
    # Several prompts per batch and a small title budget: several title chunks per batch.
    scores = torch.empty(len(ids), len(catalog))
    row_of = {int(s): r for r, s in enumerate(ids)}
    with torch.no_grad():
        for batch in iter_batches(samples, planner, td, max_rows=1000, order=ids, answer=False):
            assert batch.num_sequences > 1
            part = score_titles(model, batch, catalog, td.prompt.eot, max_rows=40)
            scores[[row_of[int(s)] for s in batch.sample_ids]] = part
    ref = reference_title_scores(tok, model, samples, ids.tolist(), planner, catalog, td.prompt.eot)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(scores.argsort(dim=1, descending=True), ref.argsort(dim=1, descending=True))
    # The scores are not trivially equal across titles or samples (a bug that ignored the prompt would).
    assert ref.std(dim=1).min() > 1e-3 and (ref[0] - ref[1]).abs().max() > 1e-4


def test_prompt_pass_matches_packed_model(setup):
    _, _, _, td, samples, model = setup
    batch = next(iter_batches(samples, make_planner("pft-i", k=2), td, max_rows=400, answer=False))
    with torch.no_grad():
        cache = encode_prompts(model, batch)
        hidden = model.hidden_states(batch)
        last = batch.cu_seqlens[1:].long() - 1
        expect = torch.log_softmax(model.lm.lm_head(hidden[last]).float(), dim=-1)
    torch.testing.assert_close(cache.first_logprobs, expect, rtol=1e-5, atol=1e-5)
    assert len(cache.keys) == model.config.num_hidden_layers


def samples_with_targets(ds, wanted, max_items=12):
    """Samples (built by hand) whose targets are every occurrence of the ``wanted`` items."""
    from patchrec.data.dataset import Samples

    pos = np.concatenate([np.flatnonzero(ds.items == w)[-3:] for w in wanted])  # a few of each: fast
    user = np.searchsorted(ds.user_offsets, pos, side="right") - 1
    start = ds.user_offsets[user]
    pos, user, start = pos[pos > start], user[pos > start], start[pos > start]
    return Samples(ds, "train", max_items, user.astype(np.int32), np.maximum(start, pos - max_items), pos)


def test_duplicate_titles_tie_and_never_count_against_the_target(setup):
    _, _, ds, td, samples, model = setup
    planner = make_planner("vanilla")
    catalog = CatalogTitles.from_table(td.titles)
    dup_samples = samples_with_targets(ds, [DUP, DUP_OF])
    targets = dup_samples.targets().astype(np.int64)
    assert {DUP, DUP_OF} <= set(targets.tolist())
    index = np.arange(len(dup_samples))
    with torch.no_grad():
        scores = exact_item_scores(model, td, dup_samples, index, catalog, planner=planner, max_rows=2048)
        other = exact_item_scores(model, td, samples, np.arange(4), catalog, planner=planner, max_rows=2048)
    for r, t in enumerate(targets):  # the target keeps the title's score, its twin steps aside
        twin = DUP_OF if t == DUP else DUP
        assert torch.isfinite(scores[r, t]) and scores[r, twin] == -torch.inf
        assert torch.isfinite(scores[r]).sum() == len(catalog)
    for r, t in enumerate(samples.targets()[:4]):
        if t not in (DUP, DUP_OF):  # one copy (the lowest id) of the duplicated title competes
            assert torch.isfinite(other[r, DUP_OF]) and other[r, DUP] == -torch.inf
    # Rank = distinct titles scored strictly above the target's title, whichever twin the target is.
    title_scores = scores[:, catalog.canonical].clone()
    tt = torch.as_tensor(catalog.item_title[targets])
    rows = torch.arange(len(index))
    title_scores[rows, tt] = scores[rows, torch.as_tensor(targets)]
    ranks = full_ranks(scores, torch.as_tensor(targets))
    expect = (title_scores > title_scores[rows, tt][:, None]).sum(1)
    assert torch.equal(ranks, expect)


def test_evaluate_exact_metrics_and_mask_history_passthrough(setup):
    _, _, _, td, samples, model = setup
    planner = make_planner("vanilla")
    res = evaluate(model, td, samples, planner=planner, limit=4, progress=False)
    res_mask = evaluate(model, td, samples, planner=planner, limit=4, mask_history=True, progress=False)
    small = limit_samples(samples, 4)
    catalog = CatalogTitles.from_table(td.titles)
    with torch.no_grad():
        fn = lambda idx: exact_item_scores(model, td, small, idx, catalog, planner=planner, max_rows=8192)  # noqa: E731
        expect = rank_samples(fn, small, mask_history=True)
    assert res.num_samples == 4 and res.ranking == "exact" and not res.mask_history and res_mask.mask_history
    np.testing.assert_array_equal(res_mask.ranks, expect)
    assert (res_mask.ranks <= res.ranks).all() and (res_mask.ranks < res.ranks).any()
    assert set(res.metrics) >= {"HR@1", "NDCG@50"} and model.training is False


def test_beam_equals_exact_ranking_when_it_can_hold_every_title(setup):
    _, _, _, td, samples, model = setup
    planner = make_planner("vanilla")
    catalog = CatalogTitles.from_table(td.titles)
    trie = TitleTrie(catalog, td.prompt.eot)
    ids = np.arange(3)
    batch = next(iter_batches(samples, planner, td, max_rows=4096, order=ids, answer=False))
    with torch.no_grad():
        exact = score_titles(model, batch, catalog, td.prompt.eot, max_rows=4096)
        out = beam_search(model, batch, trie, beams=len(catalog) + 2, groups=1, diversity=0.0,
                          protocol="clean")  # fmt: skip
    for r in range(len(ids)):
        titles = [u for u, _ in out[r]]
        assert titles == exact[r].argsort(descending=True).tolist()  # every title, in likelihood order
        got = torch.tensor([s for _, s in out[r]])
        torch.testing.assert_close(got, exact[r].sort(descending=True).values, rtol=1e-4, atol=1e-4)


def test_beam_top_titles_and_trie_constraint(setup):
    _, _, _, td, samples, model = setup
    planner = make_planner("vanilla")
    catalog = CatalogTitles.from_table(td.titles)
    trie = TitleTrie(catalog, td.prompt.eot)
    batch = next(iter_batches(samples, planner, td, max_rows=4096, order=np.arange(4), answer=False))
    with torch.no_grad():
        exact = score_titles(model, batch, catalog, td.prompt.eot, max_rows=4096)
        narrow = beam_search(model, batch, trie, beams=4, groups=1, diversity=0.0, protocol="clean")
        diverse = beam_search(model, batch, trie, beams=6, groups=3, diversity=0.8, return_tokens=True,
                              protocol="clean")  # fmt: skip
        spread = beam_search(model, batch, trie, beams=4, groups=4, diversity=1e4, return_tokens=True,
                             protocol="clean")  # fmt: skip
    for r in range(4):
        # Without diversity a hypothesis score is the title's exact log-likelihood, returned best first.
        got = torch.tensor([sc for _, sc in narrow[r]])
        torch.testing.assert_close(got, exact[r, [u for u, _ in narrow[r]]], rtol=1e-4, atol=1e-4)
        assert (got.diff() <= 0).all() and len({u for u, _ in narrow[r]}) == 4
        assert len(narrow[r]) == 4 and len(diverse[r]) == 6
        for u, _, toks in diverse[r] + spread[r]:
            np.testing.assert_array_equal(np.asarray(toks), catalog.title(u))  # only real titles
        # A huge Hamming penalty forces the groups onto different first tokens when there are enough.
        firsts = [toks[0] for _, _, toks in spread[r]]
        assert len(set(firsts)) == len(firsts)


@pytest.mark.parametrize("protocol", ["authors", "clean"])
def test_evaluate_beam_ranks(setup, protocol):
    _, _, ds, td, samples, model = setup
    planner = make_planner("vanilla")
    kw = dict(planner=planner, ranking="beam", beams=4, groups=2, limit=5, progress=False, protocol=protocol)
    res = evaluate(model, td, samples, **kw)
    masked = evaluate(model, td, samples, mask_history=True, **kw)
    assert res.ranking == "beam" and res.ranks.max() <= 4 and res.config["miss_rank"] == ">= 4"
    assert set(res.metrics) == {"HR@1", "NDCG@1"}  # K > beams would count misses as hits
    assert res.config["protocol"] == protocol and res.config["rank_rule"] == PROTOCOLS[protocol].rank_rule
    catalog = CatalogTitles.from_table(td.titles)
    longest = int(catalog.lengths.max())
    assert res.config["max_new_tokens"] == (longest if protocol == "authors" else longest + 1)
    # The ranks are the protocol's rule applied to what beam_search returns, with the dataset's title strings.
    small = limit_samples(samples, 5)
    texts = [ds.titles[i] for i in catalog.canonical]
    batch = next(iter_batches(small, planner, td, max_rows=8192, answer=False))
    with torch.no_grad():
        returned = beam_search(model, batch, TitleTrie(catalog, td.prompt.eot), beams=4, groups=2,
                               protocol=protocol)  # fmt: skip
    for sid, row in zip(batch.sample_ids.tolist(), returned, strict=True):
        target = ds.titles[small.targets()[sid]]
        rule = PROTOCOLS[protocol].rank_rule
        assert res.ranks[sid] == rank_in_returned([u for u, _ in row], target, texts, rule=rule, miss=4)
    # No tiny title is a string prefix of another, so dropping the user's earlier titles from the returned
    # list can only move the target up under either rule (authors: 1 hit of 5 here, none that masking moves).
    assert masked.mask_history and (masked.ranks <= res.ranks).all()
    assert (masked.ranks < res.ranks).any() or protocol == "authors"
    with pytest.raises(ValueError, match="groups"):
        evaluate(model, td, samples, planner=planner, ranking="beam", beams=4, groups=3)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(model, td, samples, planner=planner, ranking="beam", beams=4, groups=2, protocol="paper")
    with pytest.raises(ValueError, match="planner"):
        evaluate(model, td, samples, planner=make_planner("pretrain"))
    with pytest.raises(ValueError, match="ranking"):
        evaluate(model, td, samples, planner=planner, ranking="sampled")


@pytest.mark.parametrize("ranking", ["exact", "beam", "beam-clean"])
def test_cli_eval_smoke(setup, tmp_path, capsys, ranking):
    from patchrec.cli import main
    from patchrec.data.release import write_release

    tok, tok_dir, ds, td, _, model = setup
    model.save_pretrained(tmp_path / "model")
    write_release(ds, tmp_path / "data")
    out = tmp_path / "res.json"
    ranking, _, protocol = ranking.partition("-")
    extra = ["--protocol", protocol] if protocol else []
    code = main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--tokenizer",
                 str(tok_dir), "--plan", "pft-i", "--k", "2", "--split", "test", "--limit", "3",
                 "--max-items", "12", "--out", str(out), "--no-progress", "--ranking", ranking,
                 "--beams", "4", "--groups", "2", *extra])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    config = result["config"]
    assert result["num_samples"] == 3 and len(result["ranks"]) == 3 and result["mask_history"] is False
    assert config["ranking"] == ranking and config["plan"] == "pft-i"
    assert result["ks"] == ([1, 5, 10, 20, 50] if ranking == "exact" else [1])
    # No train_config.json next to the model: flags as given, the rest from the fallback defaults.
    origin = config["settings_from"]
    assert origin["train_config"] is None and config["g"] == 5
    assert origin["sources"] == {"plan": "flag", "k": "flag", "g": "default", "max_items": "flag"}
    if ranking == "beam":  # the protocol and its settings are recorded next to the metrics
        expect = protocol or "authors"
        assert config["protocol"] == expect and config["rank_rule"] == PROTOCOLS[expect].rank_rule
        assert config["length_penalty"] == PROTOCOLS[expect].length_penalty and "pad_id" in config
    printed = capsys.readouterr().out
    assert f"ranking={ranking}" in printed and "(unmasked, n=3" in printed and "HR    NDCG" in printed


def write_run(root, model, tok, **saved):
    """A training run directory: train_config.json, model/ (with the tokenizer), checkpoints/step-000002."""
    import shutil

    root.mkdir(parents=True)
    config = {"stage": "pft-i", "k": 5, "g": 5, "max_items": 100, "val_plan": None, "lr": 1e-5, **saved}
    (root / "train_config.json").write_text(json.dumps(config))
    model.save_pretrained(root / "model")
    tok.save_pretrained(str(root / "model"))
    shutil.copytree(root / "model", root / "checkpoints" / "step-000002")
    return root


@pytest.mark.parametrize(
    "saved, plan",
    [({"stage": "pft-s"}, "pft-s"), ({"stage": "vanilla"}, "vanilla"), ({"stage": "pretrain"}, "pft-i"),
     ({"stage": "dropout"}, "pft-i"), ({"stage": "pretrain", "val_plan": "pft-s"}, "pft-s")],
)  # fmt: skip
def test_eval_settings_default_to_the_runs_train_config(tmp_path, saved, plan):
    from patchrec.commands.eval import find_train_config, resolve_model_path, resolve_settings

    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    for d in (run_dir / "model", run_dir / "checkpoints" / "step-000004"):
        (d / "config.json").write_text("{}")
    (run_dir / "train_config.json").write_text(json.dumps({"k": 3, "g": 7, "max_items": 20, **saved}))
    args = lambda **kw: argparse.Namespace(**{"plan": None, "k": None, "g": None, "max_items": None,  # noqa: E731
                                              "force": False, **kw})  # fmt: skip
    for model in (run_dir, run_dir / "model", run_dir / "checkpoints" / "step-000004"):
        model_dir = resolve_model_path(str(model))
        assert model_dir == (run_dir / "model" if model == run_dir else model)
        assert find_train_config(model_dir) == run_dir / "train_config.json"
        values, record = resolve_settings(args(), model_dir)
        assert values == {"plan": plan, "k": 3, "g": 7, "max_items": 20}
        assert set(record["sources"].values()) == {"train_config"} and not record["force"]
    # Flags that agree are fine; a contradiction names the flag and both values unless --force.
    values, record = resolve_settings(args(plan=plan, g=7), model_dir)
    assert values["g"] == 7 and record["sources"]["g"] == "flag" and record["sources"]["k"] == "train_config"
    other = "vanilla" if plan != "vanilla" else "pft-s"
    for flag, given, have in (("plan", other, plan), ("k", 4, 3), ("g", 2, 7), ("max_items", 50, 20)):
        name = "--" + flag.replace("_", "-")
        with pytest.raises(ValueError, match=rf"{name} {given} contradicts the run's {have} "):
            resolve_settings(args(**{flag: given}), model_dir)
        values, record = resolve_settings(args(**{flag: given}, force=True), model_dir)
        assert values[flag] == given and record["force"] and record["saved"][flag] == have
    # Without a train_config.json (a model directory on its own): the old defaults.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text("{}")
    assert find_train_config(alone) is None
    values, record = resolve_settings(args(), alone)
    assert values == {"plan": "vanilla", "k": 5, "g": 5, "max_items": 100}
    assert record["train_config"] is None and set(record["sources"].values()) == {"default"}
    # A run directory without model/ is refused (its checkpoints are the models).
    (run_dir / "model" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="model/"):
        resolve_model_path(str(run_dir))


def test_cli_eval_uses_the_runs_train_config(setup, tmp_path, capsys):
    from patchrec.cli import main
    from patchrec.data.release import write_release

    tok, _, ds, _, _, model = setup
    run_dir = write_run(tmp_path / "run", model, tok, stage="pft-s", g=2, k=3, max_items=12)
    write_release(ds, tmp_path / "data")
    out = tmp_path / "res.json"
    base = ["eval", "--data", str(tmp_path / "data"), "--split", "test", "--limit", "2", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(base + ["--model", str(run_dir)]) == 0  # the run directory: its model/ and tokenizer
    config = json.loads(out.read_text())["config"]
    assert (config["plan"], config["k"], config["g"], config["max_items"]) == ("pft-s", 3, 2, 12)
    assert config["model_dir"] == str(run_dir / "model") and config["tokenizer"] == str(run_dir / "model")
    assert config["settings_from"]["train_config"] == str(run_dir / "train_config.json")
    assert set(config["settings_from"]["sources"].values()) == {"train_config"}
    assert "plan=pft-s" in capsys.readouterr().out
    checkpoint = str(run_dir / "checkpoints" / "step-000002")
    assert main(base + ["--model", checkpoint, "--plan", "vanilla"]) == 2
    err = capsys.readouterr().err
    assert "--plan vanilla contradicts the run's pft-s" in err and "--force" in err
    assert main(base + ["--model", checkpoint, "--plan", "vanilla", "--force"]) == 0
    config = json.loads(out.read_text())["config"]
    origin = config["settings_from"]
    assert config["plan"] == "vanilla" and config["max_items"] == 12 and origin["force"]
    assert origin["sources"]["plan"] == "flag" and origin["saved"]["plan"] == "pft-s"
