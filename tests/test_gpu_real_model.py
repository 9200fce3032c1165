"""SmolLM2-135M-Instruct (GGUF, from ../shared) on a GPU with the real kernels: Triton ``patch_embed`` and the
fused varlen attention, against the CPU fp32 packed path that ``test_real_model`` ties to transformers' own
forward. SmolLM2 has GQA (9 query heads, 3 key/value heads), so beam search also drives the fused kernels
through steps where a sample has no running beam left."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from conftest import shared_path

import patchrec.model.attention as attention_module
import patchrec.model.decoder as decoder_module
from patchrec.batching.pack import pack_batch
from patchrec.batching.plan import pft_i_plan, pft_s_plan, stack_plans, vanilla_plan
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.data.source import load_data
from patchrec.model.decoder import PackedLlama
from patchrec_kernels.patch_embed import patch_embed
from patchrec_kernels.varlen_attention import resolve_varlen_backend, varlen_attention

pytestmark = pytest.mark.gpu

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
L = 12


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gguf")
    gguf = shared_path("models", "smollm2-135m-instruct", MODEL_FILE)
    dataset = load_data(str(shared_path("data", "patchrec", "ml-100k")))
    tokenizer = load_tokenizer(gguf)
    tokens = tokenize_dataset(tokenizer, dataset)
    samples = make_samples(dataset, "test", L)
    model = PackedLlama.from_pretrained(gguf, vocab_size=tokens.vocab_size).eval()
    return tokenizer, dataset, tokens, samples, model


def _answer_loglik(model, batch, num_samples) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch)
    ll = torch.zeros(num_samples, dtype=torch.float64, device=out.label_loss.device)
    return -ll.index_add_(0, batch.label_sample, out.label_loss.double()).cpu()


def test_gpu_packed_path_matches_cpu_fp32(real, monkeypatch):
    """Per-sample answer log-likelihoods of a batch holding all three plans. fp32 on the GPU (Triton
    patch_embed, reference attention) matches the CPU fp32 path closely; bf16 with the fused kernels is
    within twice the error of the eager bf16 path (reference patch_embed and attention on the GPU)."""
    _, _, tokens, samples, model = real
    ids = [int(i) for i in np.flatnonzero(samples.history_lengths == L)[:6:2]]
    plans = stack_plans([vanilla_plan(L), pft_i_plan(L, 3), pft_s_plan(L, 3)])
    batch = pack_batch(samples, np.array(ids), (plans,), tokens)
    oracle = _answer_loglik(model, batch, len(ids))
    gpu_batch = batch.to("cuda")

    fp32 = copy.deepcopy(model).to("cuda")
    torch.testing.assert_close(_answer_loglik(fp32, gpu_batch, len(ids)), oracle, rtol=1e-4, atol=2e-3)
    del fp32

    bf16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    probe = torch.zeros(1, 9, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_varlen_backend(probe) in ("flash_attn", "torch")
    fused = _answer_loglik(bf16, gpu_batch, len(ids))
    for module, name, op in ((decoder_module, "patch_embed", patch_embed),
                             (attention_module, "varlen_attention", varlen_attention)):  # fmt: skip
        monkeypatch.setattr(module, name, functools.partial(op, backend="reference"))
    eager = _answer_loglik(bf16, gpu_batch, len(ids))
    err, eager_err = (fused - oracle).abs().max().item(), (eager - oracle).abs().max().item()
    assert err <= 2 * eager_err + 0.02, f"fused bf16 error {err:.4f} nats vs eager bf16 {eager_err:.4f}"


def test_gpu_beam_search_with_fused_gqa_attention(real):
    from patchrec.batching.pack import iter_batches
    from patchrec.batching.plan import make_planner
    from patchrec.eval.beam import TitleTrie, beam_search
    from patchrec.eval.exact import CatalogTitles

    tokenizer, dataset, tokens, samples, model = real
    catalog = CatalogTitles.from_table(tokens.titles)
    trie = TitleTrie(catalog, tokens.prompt.eot)
    titles = set(dataset.titles)
    bf16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    batch = next(iter_batches(samples, make_planner("pft-i", k=5), tokens, 4096, order=np.arange(3),
                              answer=False)).to("cuda")  # fmt: skip
    with torch.no_grad():
        returned = beam_search(bf16, batch, trie, beams=20, groups=20, diversity=0.8, return_tokens=True)
    assert len(returned) == 3
    for row in returned:
        texts = [tokenizer.decode(toks) for _, _, toks in row]
        assert len(row) == 20 and all(text in titles for text in texts), texts
