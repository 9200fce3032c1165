"""Every supported decoder family on the packed path against the family's own transformers ``*ForCausalLM``
(eager attention, no cache), with tiny random-init models built from transformers' own config classes and
loaded back through ``PackedDecoder.from_pretrained`` (no downloads):

- vanilla, PFT-I and PFT-S samples in one packed batch: input rows, per-sample answer log-likelihoods and
  gradients equal the family's forward on each sample's unpadded rows;
- exact ranking: every title's score equals one teacher-forced forward of ``prompt ++ title ++ eot``;
- beam search (clean protocol) returns the titles and scores of a naive loop that reruns the full forward at
  every step;
- PerSRec: the packed forward equals the family's forward with PerSRec's dense mask, and the cached state
  scores like the whole prompt.

All in fp32: log-likelihoods to 1e-4 (absolute, summed over a title), gradients to 1e-4 relative (entries
near zero: 1e-4 of the tensor's largest). The weights
are redrawn larger than the initialisers' (biases and norms included, so that Qwen2's q/k/v biases, the q/k
norms and Gemma's 1 + w norms all matter); Gemma's final-logit soft-capping is set low enough to bend every
logit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_data import build_tiny_tokenizer, tiny_dataset
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from patchrec.batching.pack import iter_batches, pack_batch
from patchrec.batching.pack_reference import ReferencePacker
from patchrec.batching.plan import make_planner, pft_i_plan, pft_s_plan, stack_plans, vanilla_plan
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.eval.beam import TitleTrie, beam_search
from patchrec.eval.exact import CatalogTitles, score_titles
from patchrec.model.attention import PackedPlan
from patchrec.model.decoder import PackedDecoder
from patchrec.persrec.reference import persrec_mask

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0)  # fmt: skip
GEMMA = dict(head_dim=16, sliding_window=256, layer_types=["sliding_attention", "full_attention"],
             final_logit_softcapping=2.0, query_pre_attn_scalar=12)  # fmt: skip
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),  # q/k norms
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=256)),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(GEMMA, attn_logit_softcapping=None)),
}
SEGMENT, TOKENS = 3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok = load_tokenizer(tok_dir)
    ds = tiny_dataset(seed=5, num_users=7, max_len=30)
    td = tokenize_dataset(tok, ds, persrec_tokens=TOKENS)
    samples = make_samples(ds, "train", max_items=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    yield tok, tok_dir, td, samples
    torch.set_num_threads(threads)


def redraw(lm, seed):
    """Weights far from the initialisers' (zero biases, unit norms would hide a dropped bias or norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 else 0.15))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, data, tmp_path_factory):
    """(name, the packed model loaded from a saved checkpoint, the family's eager reference)."""
    tok, tok_dir, td, _ = data
    config_cls, model_cls, extra = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model_cls(config_cls(vocab_size=300, **SHAPE, **extra)).save_pretrained(path)
    model = PackedDecoder.from_pretrained(path, vocab_size=td.vocab_size)  # grows the table: markers, T
    assert type(model.lm) is model_cls and model.vocab_size == td.vocab_size
    redraw(model.lm, seed=len(request.param))
    reference = model_cls(copy.deepcopy(model.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("eager")
    return request.param, model, reference


def embedded_table(reference) -> torch.Tensor:
    """[V, D]: every token as the family's own embedding module gives it (Gemma's sqrt(D) scale included);
    a patch of the reference is the mean of these rows."""
    emb = reference.get_input_embeddings()
    return emb(torch.arange(emb.num_embeddings))


def answer_logliks(reference, rows, label_rows, label_ids, mask=None) -> torch.Tensor:
    """Per-token log p(label) of the family's full ``*ForCausalLM`` forward (its head and soft-capping)."""
    kwargs = {} if mask is None else {"attention_mask": mask}
    logits = reference(inputs_embeds=rows[None], **kwargs).logits[0, label_rows].float()
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(label_ids)), torch.tensor(label_ids)]


def close_grads(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """fp32 gradients: 1e-4 relative, entries near zero to 1e-4 of the tensor's largest entry."""
    atol = 1e-4 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=name)


def test_packed_batch_matches_the_family_forward(data, family, reference_ops):
    tok, _, td, samples = data
    name, model, reference = family
    model.zero_grad()
    reference.zero_grad()
    n = samples.history_lengths
    ids = [int(i) for i in np.argsort(-n, kind="stable")[:3]]
    plans = [vanilla_plan(int(n[ids[0]])), pft_i_plan(int(n[ids[1]]), 2), pft_s_plan(int(n[ids[2]]), 3)]
    batch = pack_batch(samples, np.array(ids), (stack_plans(plans),), td)
    out = model(batch)
    out.loss.backward()

    table = embedded_table(reference)
    packer = ReferencePacker(tok, table)
    rows = model.embed(batch).detach()
    cu = batch.cu_seqlens.tolist()
    total, count = 0.0, 0
    for q, (sid, plan) in enumerate(zip(ids, plans, strict=True)):
        seq = packer.sequence(samples, sid, plan)
        # Patches over the table exactly as the family embeds a token (Gemma: scaled rows, then means).
        torch.testing.assert_close(rows[cu[q] : cu[q + 1]], seq.rows.detach(), rtol=1e-5, atol=1e-6)
        logp = answer_logliks(reference, seq.rows, seq.label_rows, seq.label_ids)
        torch.testing.assert_close(-out.sample_loss[q], logp.mean(), rtol=1e-5, atol=1e-4, msg=name)
        total = total - logp.sum()
        count += len(seq.label_ids)
    (total / count).backward()

    emb, emb_ref = model.lm.get_input_embeddings().weight, reference.get_input_embeddings().weight
    assert emb.grad.abs().sum() > 0
    close_grads(emb.grad, emb_ref.grad, name)
    grads = dict(reference.named_parameters())
    checked = 0
    for pname, p in model.lm.named_parameters():
        if "layers.0." in pname or pname.endswith(("q_proj.bias", "k_norm.weight")):
            close_grads(p.grad, grads[pname].grad, pname)
            checked += 1
    assert checked >= 7


def test_exact_scores_equal_teacher_forced_titles(data, family, reference_ops):
    tok, _, td, samples = data
    name, model, reference = family
    catalog = CatalogTitles.from_table(td.titles)
    planner = make_planner("pft-i", k=2)
    ids = np.argsort(-samples.history_lengths, kind="stable")[:2]
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids, answer=False))
    table = embedded_table(reference)
    packer = ReferencePacker(tok, table)
    with torch.no_grad():
        scores = score_titles(model.eval(), batch, catalog, td.prompt.eot, max_rows=50)
        for q, sid in enumerate(batch.sample_ids.tolist()):
            seq = packer.sequence(samples, sid, planner.plan(int(samples.history_lengths[sid]))[0])
            prompt = seq.rows[: seq.label_rows[0] + 1]
            for u in range(len(catalog)):
                title = [int(t) for t in catalog.title(u)]
                rows = torch.cat([prompt, table[title]])
                labels = title + [td.prompt.eot]
                want = answer_logliks(reference, rows, list(range(len(prompt) - 1, len(rows))), labels).sum()
                torch.testing.assert_close(scores[q, u], want, rtol=1e-5, atol=1e-4, msg=f"{name} {u}")
    assert scores.std(dim=1).min() > 1e-2


def naive_clean_beam(reference, prompt: torch.Tensor, table: torch.Tensor, trie: TitleTrie, k: int):
    """The clean protocol with one group of k beams, every step a full forward of ``prompt ++ tokens`` per
    running beam (no cache); [(title, score)] best first."""
    running = [([], 0.0, 0)]  # tokens, score, trie node
    hyps: list[tuple[float, int]] = []
    for _ in range(trie.longest + 1):
        candidates = []
        for tokens, score, node in running:
            rows = torch.cat([prompt, table[tokens]]) if tokens else prompt
            logp = torch.log_softmax(reference(inputs_embeds=rows[None]).logits[0, -1].double(), dim=-1)
            allowed, nodes = trie.allowed(node, "title_end")
            candidates += [(score + float(logp[t]), tokens + [t], n)
                           for t, n in zip(allowed.tolist(), nodes, strict=True)]  # fmt: skip
        candidates.sort(key=lambda c: -c[0])
        kept = []
        for rank, (score, tokens, node) in enumerate(candidates[: 2 * k]):
            if tokens[-1] == trie.eot:
                if rank < k:
                    hyps = sorted(hyps + [(score, trie.title_at[node])], key=lambda h: -h[0])[:k]
                continue
            kept.append((tokens, score, node))
            if len(kept) == k:
                break
        if len(hyps) >= k and (not kept or max(s for _, s, _ in kept) <= hyps[-1][0]):
            break
        running = kept
    return [(u, s) for s, u in hyps]


def test_beam_search_equals_a_naive_full_forward_loop(data, family, reference_ops):
    tok, _, td, samples = data
    name, model, reference = family
    catalog = CatalogTitles.from_table(td.titles)
    trie = TitleTrie(catalog, td.prompt.eot)
    planner = make_planner("pft-s", g=2)
    ids = np.argsort(-samples.history_lengths, kind="stable")[:2]
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids, answer=False))
    table = embedded_table(reference)
    packer = ReferencePacker(tok, table)
    with torch.no_grad():
        got = beam_search(model.eval(), batch, trie, beams=3, groups=1, protocol="clean")
        for q, sid in enumerate(batch.sample_ids.tolist()):
            seq = packer.sequence(samples, sid, planner.plan(int(samples.history_lengths[sid]))[0])
            want = naive_clean_beam(reference, seq.rows[: seq.label_rows[0] + 1], table, trie, 3)
            assert [u for u, _ in got[q]] == [u for u, _ in want], name
            np.testing.assert_allclose([s for _, s in got[q]], [s for _, s in want], rtol=1e-5, atol=1e-4)


def test_persrec_forward_equals_the_dense_mask_and_the_cache(data, family, reference_ops):
    tok, _, td, samples = data
    name, model, reference = family
    n = samples.history_lengths
    ids = np.array([int(np.flatnonzero(n == w)[0]) for w in (10, 7, 4)])  # 3, 2 and 1 old segments
    planner = make_planner("persrec", segment=SEGMENT, tokens=TOKENS)
    (batch,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids))
    packer = ReferencePacker(tok, embedded_table(reference))
    with torch.no_grad():
        out = model.eval()(batch)
        for q, sid in enumerate(ids.tolist()):
            seq, kind, seg = packer.persrec_sequence(samples, sid, SEGMENT, td.persrec_ids.tolist())
            allowed = persrec_mask(np.array(kind), np.array(seg))
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            logp = answer_logliks(reference, seq.rows, seq.label_rows, seq.label_ids, mask[None, None])
            torch.testing.assert_close(-out.sample_loss[q], logp.mean(), rtol=1e-5, atol=1e-4, msg=name)
        (prompts,) = list(iter_batches(samples, planner, td, max_rows=10**6, order=ids, answer=False))
        catalog = CatalogTitles.from_table(td.titles)
        on = score_titles(model, prompts, catalog, td.prompt.eot, max_rows=60, persrec_cache="on")
        off = score_titles(model, prompts, catalog, td.prompt.eot, max_rows=60, persrec_cache="off")
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-4)


def test_a_sequence_past_a_sliding_window_is_refused(data, reference_ops):
    _, _, td, samples = data
    torch.manual_seed(0)
    lm = MistralForCausalLM(MistralConfig(vocab_size=td.vocab_size, **SHAPE, sliding_window=16))
    model = PackedDecoder(lm)
    batch = next(iter_batches(samples, make_planner("vanilla"), td, max_rows=10**6))
    assert batch.max_seqlen > 16
    with pytest.raises(ValueError, match="sliding window of 16 positions"):
        model(batch)
    # Within the window nothing is refused: a batch cut to <= 16 rows per sequence runs.
    rows = torch.arange(8)
    plan = PackedPlan(torch.tensor([0, 8], dtype=torch.int32), 8)
    assert model.decode(model.embed_tokens(rows), rows, plan).shape == (8, SHAPE["hidden_size"])
