"""The LLM ``persrec`` plan in the window and rolling layouts: packed rows and forward (and gradients) against
transformers' own eager model (the window's dense PerSRec mask; the rolling recurrence written out segment by
segment), the cached path, truncated backpropagation, and a served user's memory kept up to date over
hundreds of interactions."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import build_tiny_tokenizer, tiny_dataset
from transformers import LlamaForCausalLM

from patchrec.batching.pack import iter_batches
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.cli import main
from patchrec.data.dataset import history_samples, make_samples
from patchrec.eval.exact import CatalogTitles, score_titles
from patchrec.model.decoder import PackedLlama
from patchrec.persrec.llm_user import RollingLLMUser
from patchrec.persrec.reference import persrec_mask

TOKENS, WINDOW, RECENT, SEGMENT = 2, 4, 3, 3

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    ds = tiny_dataset(seed=5, num_users=7, max_len=30)
    td = tokenize_dataset(tok, ds, persrec_tokens=TOKENS)
    return tok, ds, td


def eager_reference(model):
    reference = LlamaForCausalLM(copy.deepcopy(model.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("eager")
    return reference


def by_length(samples, wanted):
    n = samples.history_lengths
    return np.array([int(np.flatnonzero(n == w)[0]) for w in wanted])


def answer_losses(reference, hidden, seq):
    logits = reference.lm_head(hidden[seq.label_rows]).float()
    return F.cross_entropy(logits, torch.tensor(seq.label_ids), reduction="none")


def assert_same_grads(model, reference):
    got, want = model.lm.get_input_embeddings().weight.grad, reference.get_input_embeddings().weight.grad
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for index in range(model.config.num_hidden_layers):
        for name in ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight"):
            got = model.lm.model.layers[index].get_parameter(name).grad
            want = reference.model.layers[index].get_parameter(name).grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("old", ["item", "text"])
def test_window_forward_and_gradients_match_eager_with_the_dense_mask(setup, old):
    tok, ds, td = setup
    samples = make_samples(ds, "train", WINDOW + RECENT)
    ids = by_length(samples, [RECENT, RECENT + 1, 6, WINDOW + RECENT])  # no, one, partial, full windows
    planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT, old=old)
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=3)
    reference = eager_reference(model)
    out = model(batch)
    out.loss.backward()
    packer = ReferencePacker(tok, reference.get_input_embeddings().weight)
    with torch.no_grad():
        rows = model.embed(batch)
    cu = batch.cu_seqlens.tolist()
    total, count = 0.0, 0
    for q, sid in enumerate(ids.tolist()):
        seq, kind, seg = packer.persrec_sequence(samples, sid, SEGMENT, td.persrec_ids.tolist(), old,
                                                 window=(WINDOW, RECENT))  # fmt: skip
        torch.testing.assert_close(rows[cu[q] : cu[q + 1]], seq.rows, rtol=1e-6, atol=1e-6)
        allowed = persrec_mask(np.array(kind), np.array(seg))
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        hidden = reference.model(inputs_embeds=seq.rows[None], attention_mask=mask[None, None])
        losses = answer_losses(reference, hidden.last_hidden_state[0], seq)
        torch.testing.assert_close(out.sample_loss[q], losses.mean(), rtol=1e-5, atol=1e-5)
        total, count = total + losses.sum(), count + len(losses)
    (total / count).backward()
    assert_same_grads(model, reference)
    # the state is the prefix and the k T rows whatever the history: one carried head or old block
    assert batch.block_carried.tolist().count(TOKENS) + batch.block_carried.tolist().count(0) >= len(ids)


def test_window_cached_scores_equal_the_whole_prompt(setup):
    _, ds, td = setup
    samples = make_samples(ds, "train", WINDOW + RECENT)
    planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=4).eval()
    catalog = CatalogTitles.from_table(td.titles)
    ids = by_length(samples, [RECENT, RECENT + 1, WINDOW + RECENT])
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids, answer=False))
    with torch.no_grad():
        on = score_titles(model, batch, catalog, td.prompt.eot, max_rows=60, persrec_cache="on")
        off = score_titles(model, batch, catalog, td.prompt.eot, max_rows=60, persrec_cache="off")
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


def rolling_reference_loss(reference, packer, samples, sid, token_ids, old, k):
    """The recurrence with transformers' own model: each folded segment its own forward, its T rows' final
    hidden states the next memory, the final prompt reading the last memory."""
    folds, final, memory_row = packer.rolling_sequences(samples, sid, SEGMENT, token_ids, old)
    memory = reference.get_input_embeddings().weight[token_ids]
    for rows in folds:
        rows = torch.cat([memory, rows[k:]])
        memory = reference.model(inputs_embeds=rows[None]).last_hidden_state[0, -k:]
    rows = torch.cat([final.rows[:memory_row], memory, final.rows[memory_row + k :]])
    hidden = reference.model(inputs_embeds=rows[None]).last_hidden_state[0]
    return answer_losses(reference, hidden, final), len(folds)


@pytest.mark.parametrize("old", ["item", "text"])
def test_rolling_forward_and_gradients_match_the_recurrence_written_out(setup, old):
    tok, ds, td = setup
    samples = make_samples(ds, "train", 40)  # the whole timeline
    ids = by_length(samples, [SEGMENT, SEGMENT + 1, 8, 13])  # 0, 1, 2, 4 folded segments
    planner = make_planner("persrec", tokens=TOKENS, layout="rolling", segment=SEGMENT, old=old)
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
    assert [f.batch.num_sequences for f in batch.folds] == [3, 2, 1, 1]
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=5)
    reference = eager_reference(model)
    out = model(batch)
    out.loss.backward()
    packer = ReferencePacker(tok, reference.get_input_embeddings().weight)
    total, count = 0.0, 0
    for q, sid in enumerate(ids.tolist()):
        t_ids = td.persrec_ids.tolist()
        losses, _ = rolling_reference_loss(reference, packer, samples, sid, t_ids, old, TOKENS)
        torch.testing.assert_close(out.sample_loss[q], losses.mean(), rtol=1e-5, atol=1e-5)
        total, count = total + losses.sum(), count + len(losses)
    (total / count).backward()
    assert_same_grads(model, reference)
    t_rows = torch.as_tensor(td.persrec_ids, dtype=torch.long)
    assert model.lm.get_input_embeddings().weight.grad[t_rows].abs().sum() > 0


def test_rolling_unroll_cuts_only_the_gradient(setup):
    _, ds, td = setup
    samples = make_samples(ds, "train", 40)
    ids = by_length(samples, [13])  # 4 folded segments
    grads, losses = {}, {}
    for unroll in (0, 1):
        planner = make_planner("persrec", tokens=TOKENS, layout="rolling", segment=SEGMENT, unroll=unroll)
        (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
        assert batch.fold_unroll == unroll
        model = PackedLlama.from_preset("tiny", td.vocab_size, seed=6)
        out = model(batch)
        out.loss.backward()
        losses[unroll] = out.loss.detach()
        grads[unroll] = model.lm.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert (grads[1] - grads[0]).abs().max() > 1e-8  # the folds' parameter gradients are cut off


def test_rolling_llm_user_over_hundreds_of_interactions(setup):
    _, ds, td = setup
    planner = make_planner("persrec", tokens=TOKENS, layout="rolling", segment=7)
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=7).eval()
    history = np.random.default_rng(8).integers(0, ds.num_items, size=301)
    one, bursts = RollingLLMUser(model, td, ds, planner), RollingLLMUser(model, td, ds, planner)
    state_bytes = TOKENS * model.config.hidden_size * 4
    sizes = np.random.default_rng(9).integers(1, 30, size=300)
    cut, step = 0, 0
    for seen in range(1, len(history) + 1):
        one.add(history[seen - 1 : seen])
        if seen in (1, 7, 8, 60, 301):
            samples = history_samples(ds, [history[:seen]])
            (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, answer=False))
            with torch.no_grad():
                hidden = model.decode(model.embed(batch), batch.position_ids, model.batch_plan(batch))
                full = model.logprobs(hidden[-1:])[0]
            torch.testing.assert_close(one.first_logprobs(), full, rtol=1e-5, atol=1e-5)
            assert one.state_bytes == state_bytes and 1 <= len(one.open) <= 7
            while cut < seen:
                bursts.add(history[cut : min(cut + int(sizes[step]), seen)])
                cut, step = min(cut + int(sizes[step]), seen), step + 1
            torch.testing.assert_close(bursts.first_logprobs(), full, rtol=1e-5, atol=1e-5)
    assert one.folded == 300 // 7 and bursts.state_bytes == state_bytes
    with pytest.raises(ValueError, match="ids in"):
        one.add([ds.num_items])
    with pytest.raises(ValueError, match="rolling"):
        RollingLLMUser(model, td, ds, make_planner("persrec", tokens=TOKENS))


def test_bad_layout_flags_are_named(setup):
    with pytest.raises(ValueError, match="--persrec-layout"):
        make_planner("persrec", layout="tree")
    with pytest.raises(ValueError, match="--persrec-window"):
        make_planner("persrec", layout="window", window=0, recent=2)
    with pytest.raises(ValueError, match="--persrec-unroll"):
        make_planner("persrec", layout="rolling", unroll=-1)
    _, ds, td = setup
    samples = make_samples(ds, "train", 40)
    planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT)
    with pytest.raises(ValueError, match="window \\+ recent"):
        next(iter_batches(samples, planner, td, max_rows=10**6))


@pytest.mark.parametrize(
    "flags",
    [["--persrec-layout", "window", "--persrec-window", "5", "--persrec-recent", "3"],
     ["--persrec-layout", "rolling", "--persrec-segment", "4", "--persrec-unroll", "2"]],
    ids=["window", "rolling"],
)  # fmt: skip
def test_train_and_eval_commands_run_each_layout(tmp_path, flags, capsys):
    run = tmp_path / "run"
    assert main(["train", "--stage", "persrec", "--data", "synthetic", "--preset", "tiny", "--out", str(run),
                 "--tokenizer-vocab", "300", "--persrec-tokens", "2", "--max-steps", "2", "--batch-size", "4",
                 "--train-samples", "24", "--max-rows", "4000", "--no-progress", *flags]) == 0  # fmt: skip
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["persrec_layout"] == flags[1]
    assert saved["max_items"] == (8 if flags[1] == "window" else 100)
    results = {}
    for cache in ("on", "off"):
        out = tmp_path / f"{cache}.json"
        assert main(["eval", "--model", str(run), "--data", "synthetic", "--limit", "3", "--persrec-cache",
                     cache, "--out", str(out), "--no-progress", "--max-rows", "4000"]) == 0  # fmt: skip
        results[cache] = json.loads(out.read_text())
    assert results["on"]["ranks"] == results["off"]["ranks"]
    config = results["on"]["config"]
    assert config["persrec_layout"] == flags[1] and config["persrec_state_bytes_per_sample"] > 0
    if flags[1] == "rolling":  # the memory: k vectors of the model's width in fp32
        assert config["persrec_state_bytes_per_sample"] == 2 * 128 * 4
    assert main(["train", "--stage", "persrec", "--data", "synthetic", "--persrec-layout", "window",
                 "--persrec-window", "5", "--persrec-recent", "3", "--max-items", "9",
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert "P + R = 8" in capsys.readouterr().err
