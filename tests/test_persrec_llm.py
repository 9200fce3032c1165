"""The LLM ``persrec`` plan: packed rows and blocks against a row-by-row reference, the packed forward and its
gradients against transformers' eager Llama with PerSRec's dense mask (docs/method.md §6), cached (``on``) vs
uncached (``off``) scoring, beam search, training, the eval command and the flag errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import build_tiny_tokenizer, tiny_dataset
from transformers import LlamaForCausalLM

from patchrec.batching.pack import iter_batches, pack_batch
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import make_planner, persrec_plan, stack_plans
from patchrec.batching.tokens import load_tokenizer, persrec_token_names, tokenize_dataset
from patchrec.cli import main
from patchrec.data.dataset import make_samples
from patchrec.eval.beam import TitleTrie, beam_search
from patchrec.eval.evaluate import evaluate
from patchrec.eval.exact import CatalogTitles, score_titles
from patchrec.model.decoder import PackedLlama
from patchrec.persrec.llm import encode_full, split_state
from patchrec.persrec.reference import PREFIX, RECENT, persrec_mask
from patchrec.train.config import TrainConfig, preset
from patchrec.train.loop import train
from patchrec.train.stage_inputs import load_dataset

SEGMENT, TOKENS = 3, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok = load_tokenizer(tok_dir)
    ds = tiny_dataset(seed=5, num_users=7, max_len=30)
    td = tokenize_dataset(tok, ds, persrec_tokens=TOKENS)
    samples = make_samples(ds, "train", max_items=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    yield tok, tok_dir, ds, td, samples
    torch.set_num_threads(threads)


def ragged_ids(samples, count=5):
    """Samples with 0, 1, 2, 3 old segments and a full final block: ragged blocks, several per batch."""
    n = samples.history_lengths
    wanted = [2, 4, 7, 9, 10, 3, 11]  # segments (n-1)//3: 0, 1, 2, 2, 3, 0, 3; recent 2, 1, 1, 3, 1, 3, 2
    ids = [int(np.flatnonzero(n == w)[0]) for w in wanted if np.any(n == w)]
    assert len(ids) >= count and len({(int(n[i]) - 1) // SEGMENT for i in ids}) >= 3
    return np.array(ids[:count])


def eager_reference(model):
    reference = LlamaForCausalLM(copy.deepcopy(model.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("eager")
    return reference


def masked_forward(reference, rows, kind, seg):
    """The plain transformers model on one sequence with PerSRec's dense mask as a 4-D additive mask."""
    allowed = persrec_mask(np.array(kind), np.array(seg))
    mask = torch.zeros(allowed.shape, dtype=rows.dtype).masked_fill(~allowed, torch.finfo(rows.dtype).min)
    return reference.model(inputs_embeds=rows[None], attention_mask=mask[None, None]).last_hidden_state[0]


def test_tokens_extend_the_vocabulary(setup):
    tok, _, _, td, _ = setup
    assert td.persrec_ids.tolist() == tok.convert_tokens_to_ids(persrec_token_names(TOKENS))
    assert td.vocab_size == len(tok) and max(td.persrec_ids) == td.vocab_size - 1
    again = tokenize_dataset(tok, tiny_dataset(seed=5, num_users=7, max_len=30), persrec_tokens=TOKENS)
    # idempotent
    assert again.vocab_size == td.vocab_size and np.array_equal(again.persrec_ids, td.persrec_ids)


@pytest.mark.parametrize("old", ["item", "text"])
def test_packed_rows_and_blocks_match_the_row_by_row_reference(setup, old):
    tok, _, _, td, samples = setup
    ids = ragged_ids(samples)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=1)
    plans = [persrec_plan(int(samples.history_lengths[i]), SEGMENT, old) for i in ids]
    batch = pack_batch(samples, ids, (stack_plans(plans),), td, persrec=(SEGMENT, TOKENS))
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS, old=old)
    (same,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
    for name in ("token_ids", "row_offsets", "cu_seqlens", "label_rows", "block_carried"):
        assert torch.equal(getattr(batch, name), getattr(same, name)), name
    packer = ReferencePacker(tok, model.lm.get_input_embeddings().weight)
    with torch.no_grad():
        rows = model.embed(batch)
    cu = batch.cu_seqlens.tolist()
    cu_q = batch.layout.cu_q.tolist()
    for q, sid in enumerate(ids.tolist()):
        seq, kind, seg = packer.persrec_sequence(samples, sid, SEGMENT, td.persrec_ids.tolist(), old)
        torch.testing.assert_close(rows[cu[q] : cu[q + 1]], seq.rows, rtol=1e-6, atol=1e-6)
        assert (batch.label_rows[batch.label_sample == q] - cu[q]).tolist() == seq.label_rows
        # Blocks: the prefix, each old segment (its items and T rows), the final block.
        block = ["prefix" if k == PREFIX else "recent" if k == RECENT else s
                 for k, s in zip(kind, seg, strict=True)]  # fmt: skip
        starts = [r for r in range(len(block)) if r == 0 or block[r] != block[r - 1]]
        assert [b - cu[q] for b in cu_q if cu[q] <= b < cu[q + 1]] == starts
        segs = (int(samples.history_lengths[sid]) - 1) // SEGMENT
        text = td.titles.lengths[samples.history(sid)].sum()
        assert int(batch.hist_tokens_before[q]) == text
        if old == "item":
            recent = td.titles.lengths[samples.history(sid)[segs * SEGMENT :]].sum()
            assert int(batch.hist_tokens_after[q]) == recent + segs * (SEGMENT + TOKENS)


@pytest.mark.parametrize("old", ["item", "text"])
def test_packed_forward_and_gradients_match_eager_with_the_dense_mask(setup, reference_ops, old):
    tok, _, _, td, samples = setup
    ids = ragged_ids(samples)
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS, old=old)
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
    assert batch.num_sequences == len(ids) and batch.layout is not None
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=3)
    reference = eager_reference(model)

    out = model(batch)
    out.loss.backward()

    packer = ReferencePacker(tok, reference.get_input_embeddings().weight)
    total, count, hidden = 0.0, 0, []
    for q, sid in enumerate(ids.tolist()):
        seq, kind, seg = packer.persrec_sequence(samples, sid, SEGMENT, td.persrec_ids.tolist(), old)
        h = masked_forward(reference, seq.rows, kind, seg)
        logits = reference.lm_head(h[seq.label_rows]).float()
        losses = F.cross_entropy(logits, torch.tensor(seq.label_ids), reduction="none")
        torch.testing.assert_close(out.sample_loss[q], losses.mean(), rtol=1e-5, atol=1e-5)
        hidden.append(h[seq.label_rows])
        total = total + losses.sum()
        count += len(seq.label_ids)
    torch.testing.assert_close(out.answer_hidden, torch.cat(hidden), rtol=1e-4, atol=1e-5)
    (total / count).backward()

    emb, emb_ref = model.lm.get_input_embeddings().weight, reference.get_input_embeddings().weight
    t_rows = torch.as_tensor(td.persrec_ids, dtype=torch.long)
    assert emb.grad[t_rows].abs().sum() > 0
    torch.testing.assert_close(emb.grad, emb_ref.grad, rtol=1e-4, atol=1e-6)
    for index in range(model.config.num_hidden_layers):
        layer, layer_ref = model.lm.model.layers[index], reference.model.layers[index]
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "mlp.down_proj.weight"):  # fmt: skip
            grad, grad_ref = layer.get_parameter(name).grad, layer_ref.get_parameter(name).grad
            torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6, msg=name)

    # The mask matters: the same rows under plain causal attention give other answer states.
    q = int(np.argmax(samples.history_lengths[ids]))
    seq, _, _ = packer.persrec_sequence(samples, int(ids[q]), SEGMENT, td.persrec_ids.tolist(), old)
    causal = reference.model(inputs_embeds=seq.rows[None]).last_hidden_state[0]
    assert (causal[seq.label_rows] - hidden[q]).abs().max() > 1e-3


def test_micro_batches_give_the_same_sample_losses(setup, reference_ops):
    _, _, _, td, samples = setup
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS)
    ids = ragged_ids(samples)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=2).eval()
    (whole,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
    small = list(iter_batches(samples, planner, td, max_rows=int(whole.cu_seqlens.diff().max()), order=ids))
    assert len(small) > 1
    with torch.no_grad():
        want = model(whole).sample_loss
        got = torch.cat([model(b).sample_loss for b in small])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("old", ["item", "text"])
def test_cached_state_scores_equal_the_whole_prompt_and_the_reference(setup, reference_ops, old):
    tok, _, ds, td, samples = setup
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS, old=old)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=4).eval()
    catalog = CatalogTitles.from_table(td.titles)
    ids = ragged_ids(samples)
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids, answer=False))
    with torch.no_grad():
        on = score_titles(model, batch, catalog, td.prompt.eot, max_rows=60, persrec_cache="on")
        off = score_titles(model, batch, catalog, td.prompt.eot, max_rows=60, persrec_cache="off")
        state = split_state(model, batch)[0]
        full = encode_full(model, batch)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    assert on.std(dim=1).min() > 1e-3
    # The state: the prefix block and k rows per old segment, per layer; what a continuation sees.
    segs = (samples.history_lengths[ids] - 1) // SEGMENT
    prefix = int(batch.layout.cu_q[1])
    assert state.rows().tolist() == (prefix + segs * TOKENS).tolist()
    final_rows = batch.cu_seqlens.diff().numpy() - state.next_position
    assert full.cu_seqlens.diff().tolist() == (state.rows() + final_rows).tolist()
    # layers x (K, V) x Hkv x Dh x fp32 bytes per state row
    assert state.nbytes()[0] == state.rows()[0] * 2 * 2 * 2 * 32 * 4

    # One eager forward of [prompt ++ title] per (sample, title), title rows RECENT.
    reference = eager_reference(model).eval()
    packer = ReferencePacker(tok, reference.get_input_embeddings().weight)
    weight = reference.get_input_embeddings().weight
    with torch.no_grad():
        for q, sid in enumerate(ids[:2].tolist()):
            seq, kind, seg = packer.persrec_sequence(samples, sid, SEGMENT, td.persrec_ids.tolist(), old)
            cut = seq.label_rows[0] + 1
            for u in range(len(catalog)):
                title = [int(t) for t in catalog.title(u)]
                rows = torch.cat([seq.rows[:cut], weight[title]])
                h = masked_forward(reference, rows, kind[:cut] + [RECENT] * len(title),
                                   seg[:cut] + [-1] * len(title))  # fmt: skip
                logp = torch.log_softmax(reference.lm_head(h[cut - 1 :]).double(), dim=-1)
                labels = title + [td.prompt.eot]
                want = logp[torch.arange(len(labels)), torch.tensor(labels)].sum()
                torch.testing.assert_close(on[q, u].double(), want, rtol=1e-4, atol=1e-4)


def test_beam_search_same_with_and_without_the_cache(setup, reference_ops):
    _, _, _, td, samples = setup
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=6).eval()
    catalog = CatalogTitles.from_table(td.titles)
    trie = TitleTrie(catalog, td.prompt.eot)
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ragged_ids(samples, 3),
                                 answer=False))  # fmt: skip
    with torch.no_grad():
        got = {c: beam_search(model, batch, trie, beams=4, groups=2, protocol="clean", persrec_cache=c)
               for c in ("on", "off")}  # fmt: skip
        scores = score_titles(model, batch, catalog, td.prompt.eot, max_rows=200)
    assert [[u for u, _ in row] for row in got["on"]] == [[u for u, _ in row] for row in got["off"]]
    for a, b in zip(got["on"], got["off"], strict=True):
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5, atol=1e-5)
    # Beams hold genuine title log-likelihoods (clean protocol: the sum of token log-probs).
    for q, row in enumerate(got["on"]):
        for u, s in row:
            assert abs(float(scores[q, u]) - s) < 1e-4


def test_evaluate_records_the_cache_and_state_size(setup, reference_ops):
    _, _, _, td, samples = setup
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=6)
    res = {c: evaluate(model, td, samples, planner=planner, persrec_cache=c, limit=6, max_rows=600,
                       progress=False) for c in ("on", "off")}  # fmt: skip
    assert np.array_equal(res["on"].ranks, res["off"].ranks)
    config = res["on"].config
    assert config["persrec_cache"] == "on" and res["off"].config["persrec_cache"] == "off"
    assert config["persrec_state_bytes_per_sample"] > config["persrec_token_state_bytes_per_sample"] > 0
    assert config["persrec_state_bytes_per_row"] == 2 * 2 * 2 * 32 * 4
    with pytest.raises(ValueError, match="--persrec-cache"):
        evaluate(model, td, samples, planner=planner, persrec_cache="maybe", limit=2)


def test_two_training_steps_change_the_t_rows_and_the_eval_command(setup, tmp_path, reference_ops_one_thread,
                                                                   capsys):  # fmt: skip
    # The default synthetic data: what ``patchrec eval --data synthetic`` loads.
    config = preset("tiny", data="synthetic", tokenizer_vocab=300, max_items=10, max_rows=1200,
                    progress=False, stage="persrec", persrec_segment=3, persrec_tokens=2, max_steps=2,
                    batch_size=6, out=str(tmp_path / "run"), train_samples=40)  # fmt: skip
    result = train(config)
    assert result.step == 2 and np.isfinite(result.final_loss)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["stage"] == "persrec" and saved["persrec_segment"] == 3
    tok = load_tokenizer(tmp_path / "run" / "model")
    t_ids = tok.convert_tokens_to_ids(persrec_token_names(2))
    tokens = tokenize_dataset(tok, load_dataset(config), persrec_tokens=2)
    before = PackedLlama.from_preset("tiny", tokens.vocab_size, seed=config.seed).lm.get_input_embeddings()
    after = PackedLlama.from_pretrained(tmp_path / "run" / "model").lm.get_input_embeddings()
    assert after.num_embeddings == tokens.vocab_size
    moved = (after.weight[t_ids] - before.weight[t_ids]).abs().amax(dim=1)
    assert bool((moved > 0).all())

    results = {}
    for cache in ("on", "off"):
        out = tmp_path / f"res-{cache}.json"
        assert main(["eval", "--model", str(tmp_path / "run"), "--data", "synthetic", "--split", "test",
                     "--limit", "4", "--persrec-cache", cache, "--out", str(out), "--no-progress",
                     "--max-rows", "800"]) == 0  # fmt: skip
        results[cache] = json.loads(out.read_text())
    assert "persrec cache on" in capsys.readouterr().out
    on, off = results["on"], results["off"]
    assert on["config"]["plan"] == "persrec" and on["config"]["persrec_cache"] == "on"
    assert off["config"]["persrec_cache"] == "off" and on["config"]["persrec_segment"] == 3
    assert on["config"]["persrec_state_bytes_per_sample"] > 0
    assert on["ranks"] == off["ranks"]
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", "synthetic", "--persrec-tokens", "3",
                 "--out", str(tmp_path / "x.json")]) == 2  # fmt: skip
    assert "--persrec-tokens 3 contradicts" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", "synthetic", "--plan", "pft-i",
                 "--force", "--persrec-cache", "on", "--out", str(tmp_path / "x.json")]) == 2  # fmt: skip
    assert "--persrec-cache is only for --plan persrec" in capsys.readouterr().err


def test_bad_persrec_values_name_the_flag(setup, tmp_path, capsys):
    _, _, _, td, samples = setup
    with pytest.raises(ValueError, match="--persrec-tokens"):
        make_planner("persrec", tokens=0)
    with pytest.raises(ValueError, match="--persrec-segment"):
        make_planner("persrec", segment=0)
    with pytest.raises(ValueError, match="--persrec-old"):
        make_planner("persrec", old="session")
    with pytest.raises(ValueError, match="--persrec-tokens"):
        TrainConfig(stage="persrec", persrec_tokens=0)
    with pytest.raises(ValueError, match="--persrec-segment"):
        TrainConfig(stage="persrec", persrec_segment=-1)
    with pytest.raises(ValueError, match="--persrec-segment is only for --stage persrec"):
        TrainConfig(stage="pft-i", persrec_segment=10)
    assert main(["train", "--stage", "pft-s", "--data", "synthetic", "--persrec-tokens", "4",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--persrec-tokens is only for --stage persrec" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--persrec-tokens"):
        tokenize_dataset(load_tokenizer(setup[1]), setup[2], persrec_tokens=-1)
    # More T tokens than the tokenisation holds.
    with pytest.raises(ValueError, match="--persrec-tokens 5"):
        next(iter_batches(samples, make_planner("persrec", tokens=5), td, max_rows=10**6))


def test_llm_state_folds_one_segment_at_a_time(setup):
    # The incremental path: the prefix state first, then each old segment folded into it, as interactions
    # arrive; the result equals the state split_state builds in one pass over prefix + all segments.
    _, _, _, td, samples = setup
    from patchrec.batching.blocks import block_layout
    from patchrec.persrec.llm import Blocks, encode_state

    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=6).eval()
    sid = int(np.flatnonzero(samples.history_lengths == 10)[0])  # 3 old segments, 1 recent item
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=np.array([sid]), answer=False))
    blocks = Blocks.of(batch)
    assert len(blocks.rows) == 5  # prefix, 3 segments, final
    with torch.no_grad():
        whole = split_state(model, batch)[0]
        embeds = model.embed(batch)
        state = None
        for b in range(4):
            rows = torch.arange(int(blocks.start[b]), int(blocks.start[b] + blocks.rows[b]))
            context = None if state is None else state.rows()
            layout = block_layout(blocks.rows[b : b + 1], blocks.carried[b : b + 1], np.zeros(1), 1, context)
            done = int(blocks.start[b] + blocks.rows[b])
            state = encode_state(model, embeds[rows], batch.position_ids[rows], layout,
                                 next_position=np.array([done]), context=state)  # fmt: skip
    assert state.rows().tolist() == whole.rows().tolist() == [int(blocks.rows[0]) + 3 * TOKENS]
    assert state.next_position.tolist() == whole.next_position.tolist()
    for a, b in zip(state.keys + state.values, whole.keys + whole.values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.positions, whole.positions)
