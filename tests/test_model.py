"""The packed model vs the unmodified transformers Llama run on each sample alone (eager attention), with
inputs from the slow reference materialisation: losses, answer hidden states and gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import build_tiny_tokenizer, tiny_dataset
from transformers import LlamaForCausalLM

from patchrec.batching.pack import pack_batch
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import pft_i_plan, pft_s_plan, pretrain_plans, stack_plans, vanilla_plan
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.model.decoder import PRESETS, PackedLlama, llama_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    ds = tiny_dataset(seed=5, num_users=6, max_len=30)
    td = tokenize_dataset(tok, ds)
    samples = make_samples(ds, "train", max_items=14)
    return tok, td, samples


def mixed_batch(samples, td):
    """One batch mixing vanilla, PFT-I, PFT-S and both views of a pre-training sample."""
    n = samples.history_lengths
    ids = [int(i) for i in np.argsort(-n)[:4]]  # the longest histories: sessions with remainders
    rng = np.random.default_rng(0)
    text_view, patched_view = pretrain_plans(int(n[ids[3]]), 0.5, rng)
    plans = [
        vanilla_plan(int(n[ids[0]])),
        pft_i_plan(int(n[ids[1]]), 3),
        pft_s_plan(int(n[ids[2]]), 3),
        text_view,
        patched_view,
    ]
    seq_ids = ids + [ids[3]]
    return seq_ids, plans, pack_batch(samples, np.array(seq_ids), (stack_plans(plans),), td)


def test_packed_model_matches_per_sample_transformers(setup):
    tok, td, samples = setup
    seq_ids, plans, batch = mixed_batch(samples, td)
    assert len(set(batch.hist_tokens_after.tolist())) > 1  # the plans really differ
    model = PackedLlama.from_preset("tiny", td.vocab_size, seed=3)
    # Non-zero, non-tied scales everywhere so that a wrong row or a leaked sample shows up in every output.
    reference = LlamaForCausalLM(copy.deepcopy(model.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("eager")

    out = model(batch)
    out.loss.backward()

    packer = ReferencePacker(tok, reference.get_input_embeddings().weight)
    total, count, hidden = 0.0, 0, []
    for q, (sid, plan) in enumerate(zip(seq_ids, plans, strict=True)):
        seq = packer.sequence(samples, sid, plan)
        h = reference.model(inputs_embeds=seq.rows[None]).last_hidden_state[0]
        logits = reference.lm_head(h[seq.label_rows]).float()
        losses = F.cross_entropy(logits, torch.tensor(seq.label_ids), reduction="none")
        torch.testing.assert_close(out.sample_loss[q], losses.mean(), rtol=1e-5, atol=1e-5)
        hidden.append(h[seq.label_rows])
        total = total + losses.sum()
        count += len(seq.label_ids)
    torch.testing.assert_close(out.answer_hidden, torch.cat(hidden), rtol=1e-4, atol=1e-5)
    (total / count).backward()

    emb, emb_ref = model.lm.get_input_embeddings().weight, reference.get_input_embeddings().weight
    assert emb.grad.abs().sum() > 0
    torch.testing.assert_close(emb.grad, emb_ref.grad, rtol=1e-4, atol=1e-6)
    layer, layer_ref = model.lm.model.layers[1], reference.model.layers[1]
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight"):
        grad, grad_ref = layer.get_parameter(name).grad, layer_ref.get_parameter(name).grad
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_answer_rows_only_reach_the_output_head(setup, monkeypatch):
    """The output head sees N answer rows, never all R rows."""
    tok, td, samples = setup
    _, _, batch = mixed_batch(samples, td)
    model = PackedLlama.from_preset("tiny", td.vocab_size)
    seen = []
    model.lm.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    model(batch)
    assert seen == [batch.label_rows.numel()] and seen[0] < batch.num_rows


def test_checkpoint_round_trip_and_marker_resize(setup, tmp_path):
    tok, td, samples = setup
    base_vocab = td.vocab_size - 3  # as if the checkpoint predates the three history markers
    model = PackedLlama.from_preset("tiny", base_vocab, seed=1)
    model.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "base").iterdir())

    loaded = PackedLlama.from_pretrained(tmp_path / "base", vocab_size=td.vocab_size)
    emb = loaded.lm.get_input_embeddings().weight
    assert emb.shape[0] == td.vocab_size
    torch.testing.assert_close(emb[:base_vocab], model.lm.get_input_embeddings().weight)
    _, _, batch = mixed_batch(samples, td)
    loaded.save_pretrained(tmp_path / "resized")
    again = PackedLlama.from_pretrained(tmp_path / "resized")
    torch.testing.assert_close(again(batch).label_loss, loaded(batch).label_loss)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        llama_config("huge", 100)
    with pytest.raises(ValueError, match="vocab_size"):
        llama_config("tiny", 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        PackedLlama.from_pretrained(tmp_path)
    assert PRESETS["llama-3.2-1b"].hidden_size == 2048
