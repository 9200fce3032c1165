"""A real pretrained Llama (SmolLM2-135M-Instruct, GGUF, from ../shared; skipped without it) end to end:
the packed path against transformers' own forward of the same checkpoint, fp32 training from the GGUF file,
a saved model that plain transformers reloads, and beam evaluation over a real catalog."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path

from patchrec.batching.pack import pack_batch
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import pft_i_plan, pft_s_plan, stack_plans, vanilla_plan
from patchrec.batching.tokens import history_text, load_tokenizer, render_prompt_text, tokenize_dataset
from patchrec.data.dataset import HISTORY_PLACEHOLDER, make_samples
from patchrec.data.source import load_data
from patchrec.model.backbone import load_causal_lm
from patchrec.model.decoder import PackedLlama

pytestmark = pytest.mark.usefixtures("reference_ops")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
L = 12  # history length: long enough for sessions (G = 3) and patches (K = 3), short enough for 2 cores


@pytest.fixture(scope="module")
def real():
    gguf = shared_path("models", "smollm2-135m-instruct", MODEL_FILE)
    data = shared_path("data", "patchrec", "ml-100k")
    tokenizer = load_tokenizer(gguf)
    dataset = load_data(str(data))
    tokens = tokenize_dataset(tokenizer, dataset)
    samples = make_samples(dataset, "test", L)
    model = PackedLlama.from_pretrained(gguf, vocab_size=tokens.vocab_size).eval()
    return gguf, tokenizer, dataset, tokens, samples, model


def test_gguf_loads_as_a_plain_fp32_llama_with_its_chat_template(real):
    gguf, tokenizer, dataset, tokens, _, model = real
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    config = model.lm.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads) == (30, 576, 9, 3)  # fmt: skip
    assert getattr(config, "quantization_config", None) is None  # an ordinary, serialisable model
    assert tokens.vocab_size == 49152 + 3 == model.lm.get_input_embeddings().num_embeddings
    # The prompt is the tokenizer's own ChatML template, the answer closes with its end-of-turn token.
    text = render_prompt_text(tokenizer, dataset.system_prompt, dataset.user_prompt)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokens.prompt.eot_token == "<|im_end|>"


def _samples_and_plans(samples):
    n = samples.history_lengths
    ids = [int(i) for i in np.flatnonzero(n == L)[:6:2]]  # full-length histories of different users
    plans = [vanilla_plan(L), pft_i_plan(L, 3), pft_s_plan(L, 3)]
    return ids, plans


def test_packed_path_matches_transformers_own_forward(real):
    """The first parity test on pretrained weights: per-sample answer log-likelihoods of the packed path
    (patch_embed + varlen attention, every plan in one batch) equal transformers' own forward of the
    checkpoint it loaded from the GGUF file (token ids for the all-text sample, reference patch rows as
    inputs_embeds for PFT-I and PFT-S)."""
    from transformers import AutoModelForCausalLM

    gguf, tokenizer, dataset, tokens, samples, model = real
    ids, plans = _samples_and_plans(samples)
    batch = pack_batch(samples, np.array(ids), (stack_plans(plans),), tokens)
    with torch.no_grad():
        out = model(batch)
    packed_ll = -torch.zeros(len(ids)).index_add_(0, batch.label_sample, out.label_loss)

    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)  # fmt: skip
    reference.resize_token_embeddings(tokens.vocab_size, mean_resizing=False)
    own = model.lm.state_dict()
    with torch.no_grad():  # the three marker rows are new: give the reference the packed model's
        reference.get_input_embeddings().weight[-3:] = own["model.embed_tokens.weight"][-3:]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, own[name]), name  # the GGUF -> plain Llama copy is exact
    reference.eval()

    packer = ReferencePacker(tokenizer, reference.get_input_embeddings().weight)
    for q, (sid, plan) in enumerate(zip(ids, plans, strict=True)):
        seq = packer.sequence(samples, sid, plan)
        with torch.no_grad():
            if plan.kinds.max() == 0:  # all text: transformers reads token ids of the rendered conversation
                titles = [dataset.titles[i] for i in samples.history(sid)]
                prompt = render_prompt_text(tokenizer, dataset.system_prompt, dataset.user_prompt)
                text = prompt.replace(HISTORY_PLACEHOLDER, history_text(titles))
                text += dataset.titles[samples.target(sid)] + tokens.prompt.eot_token
                input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
                assert input_ids.shape[1] == len(seq.rows) + 1  # the packer's stream is the text's tokens
                logits = reference(input_ids=input_ids).logits[0]
            else:
                logits = reference(inputs_embeds=seq.rows[None]).logits[0]
        logp = torch.log_softmax(logits[seq.label_rows].float(), dim=-1)
        ref_ll = logp[torch.arange(len(seq.label_ids)), torch.tensor(seq.label_ids)].sum()
        torch.testing.assert_close(packed_ll[q], ref_ll, rtol=1e-4, atol=2e-3)
        assert ref_ll > -80  # a pretrained model: a plausible title, not noise


def test_two_training_steps_from_gguf_keep_fp32_and_reload_in_plain_transformers(real, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from patchrec.train.config import TrainConfig
    from patchrec.train.loop import train

    gguf, _, dataset, tokens, samples, _ = real
    data = str(shared_path("data", "patchrec", "ml-100k"))
    config = TrainConfig(stage="pft-i", k=2, init=str(gguf), data=data, max_items=5, train_samples=4,
                         batch_size=2, max_steps=2, lr=1e-5, warmup_ratio=0.0, max_rows=2048,
                         out=str(tmp_path / "run"), progress=False)  # fmt: skip
    result = train(config)
    assert result.step == 2 and result.samples_trained == 4

    plain = AutoModelForCausalLM.from_pretrained(result.model_dir)  # no patchrec involved
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    base = load_causal_lm(gguf).state_dict()
    trained = plain.state_dict()
    for name, before in base.items():
        if ".layers." in name and "norm" not in name:
            changed = float((trained[name] != before).float().mean())
            assert changed > 0.9, (name, changed)

    # Same logits from plain transformers and from the packed path over the saved directory.
    reloaded_tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert len(reloaded_tok) == tokens.vocab_size
    packed = PackedLlama.from_pretrained(result.model_dir).eval()
    ids = [int(np.flatnonzero(samples.history_lengths == L)[0])]
    batch = pack_batch(samples, np.array(ids), (stack_plans([vanilla_plan(L)]),), tokens)
    stream = batch.token_ids.long()[None]  # all text: one token per row
    with torch.no_grad():
        ours = packed.lm.lm_head(packed.hidden_states(batch)[batch.label_rows])
        theirs = plain(input_ids=stream).logits[0, batch.label_rows]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("protocol", ["authors", "clean"])
def test_beam_search_returns_twenty_catalog_titles(real, protocol):
    """20 whole catalog titles per sample, and at least 10 distinct ones. Not 20 distinct: with 20 groups of
    one beam, two groups can end on the same title (the Hamming penalty only separates the groups' tokens
    within one step), and both protocols keep such repeats as transformers does (13 distinct titles on the
    first sample here); the rank rules read the first / last copy."""
    from patchrec.batching.pack import iter_batches
    from patchrec.batching.plan import make_planner
    from patchrec.eval.beam import TitleTrie, beam_search
    from patchrec.eval.exact import CatalogTitles

    _, tokenizer, dataset, tokens, samples, model = real
    catalog = CatalogTitles.from_table(tokens.titles)
    trie = TitleTrie(catalog, tokens.prompt.eot)
    titles = set(dataset.titles)
    batch = next(iter_batches(samples, make_planner("pft-i", k=5), tokens, 4096, order=np.arange(3),
                              answer=False))  # fmt: skip
    with torch.no_grad():
        returned = beam_search(model, batch, trie, beams=20, groups=20, diversity=0.8, protocol=protocol,
                               return_tokens=True)  # fmt: skip
    assert len(returned) == 3
    for row in returned:
        assert len(row) == 20
        texts = [tokenizer.decode(toks) for _, _, toks in row]
        assert all(text in titles for text in texts), texts  # every hypothesis is a whole catalog title
        assert len(set(texts)) >= 10, texts


def test_eval_command_reads_a_gguf_model(real, tmp_path, capsys):
    import json

    from patchrec.cli import main

    gguf = real[0]
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(gguf), "--data", str(shared_path("data", "patchrec", "ml-100k")),
            "--plan", "pft-i", "--max-items", "10", "--ranking", "beam", "--limit", "2", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 2 and result["config"]["protocol"] == "authors"
    assert result["config"]["unreachable_prefix_titles"] > 0  # ML-100K has titles that prefix others
