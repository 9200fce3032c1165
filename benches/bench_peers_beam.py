"""Beam ranking per user (the authors' protocol: 20 beams in 20 groups, diversity 0.8, trie over the ML-1M
titles), patchrec against transformers' KV cache and the authors' uncached generation, on real users.

Every provider runs the same search (``patchrec.eval.beam.search``: groups, trie, protocol) and differs only
in the ``BeamDecoder`` that gives it log-probs:
- ``patchrec``: ``PackedBeamDecoder``: the packed prompt once (keys/values kept), then one row per running
  beam per step attending to the cached prompt and to the beam's own cached tokens;
- ``hf-cache``: transformers' ``DynamicCache``: the prompt (the same rows, ``F.embedding_bag``) once, then
  the cache expanded to the beams, reordered by parent each step (``reorder_cache``) and fed one token per
  beam, the head on the last position;
- ``authors-nocache``: the authors' ``generate(..., use_cache=False)``: every step runs the compressed
  prompt (their collator's rows) and each beam's generated tokens from scratch, the head on the last
  position. Tiny preset only: on SmolLM2 a user takes minutes per step on a CPU.
Cases: model x plan (vanilla, PFT-I k=5, PFT-S g=5) x L (20, 50, 100) x provider; ``USERS`` users, one search
each (one user per call, as the authors' evaluation runs). Each provider's returned titles and scores are
checked equal to patchrec's before timing.

``extra_info``: seconds per user (median and min of the rounds / users), prompt rows, beam steps and beam
rows decoded (summed over the users), the model, load average before and after.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from machine import measured_seconds, sync
from peers import MODELS, PLANS, available, bag_rows, load, long_users, machine_info, pack, user_samples

if available():
    pytest.skip(available(), allow_module_level=True)

import authors  # noqa: E402

from patchrec.eval.beam import BeamDecoder, PackedBeamDecoder, TitleTrie, search  # noqa: E402
from patchrec.eval.exact import CatalogTitles  # noqa: E402

USERS = int(os.environ.get("PATCHREC_PEER_BEAM_USERS", 4))
ROUNDS = int(os.environ.get("PATCHREC_PEER_ROUNDS", 5))
LENGTHS = [20, 50, 100]
PROVIDERS = ["patchrec", "hf-cache", "authors-nocache"]
BEAMS = 20


class HFCacheDecoder(BeamDecoder):
    """transformers' own KV cache for one prompt (input rows [P, D])."""

    def __init__(self, hf, rows: torch.Tensor):
        self.hf, self.prompt_rows = hf, rows.shape[0]
        out = hf.model(inputs_embeds=rows[None], use_cache=True)
        self.cache = out.past_key_values
        self.num_sequences = 1
        self.first_logprobs = torch.log_softmax(hf.lm_head(out.last_hidden_state[:, -1]).float(), dim=-1)

    def step(self, parents, tokens, seqs, step):
        n = len(tokens)
        # Step 1 expands the one prompt to the beams; later steps follow each beam's parent.
        self.cache.reorder_cache(torch.tensor(parents) if step > 1 else torch.zeros(n, dtype=torch.long))
        position = torch.full((n, 1), self.prompt_rows + step - 1)
        out = self.hf(input_ids=torch.tensor(tokens)[:, None], cache=self.cache,
                      position_ids=position, use_cache=True, logits_to_keep=1)  # fmt: skip
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


class NoCacheDecoder(BeamDecoder):
    """The authors' uncached generation for one prompt (their compressed inputs_embeds [1, P, D])."""

    def __init__(self, hf, embeds: torch.Tensor):
        self.hf, self.embeds = hf, embeds
        out = hf(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
        self.num_sequences = 1
        self.first_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        self.generated: list[list[int]] = [[]]

    def step(self, parents, tokens, seqs, step):
        pairs = zip(parents, tokens, strict=True)
        self.generated = [(self.generated[p] if step > 1 else []) + [t] for p, t in pairs]
        ids = torch.tensor(self.generated)
        x = torch.cat([self.embeds.expand(len(tokens), -1, -1), self.hf.get_input_embeddings()(ids)], dim=1)
        out = self.hf(inputs_embeds=x, use_cache=False, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


class Counting(BeamDecoder):
    """Counts the steps and beam rows another decoder runs."""

    def __init__(self, inner: BeamDecoder, counts: dict):
        self.inner, self.counts = inner, counts
        self.num_sequences, self.first_logprobs = inner.num_sequences, inner.first_logprobs

    def step(self, parents, tokens, seqs, step):
        self.counts["steps"] = self.counts.get("steps", 0) + 1
        self.counts["beam_rows"] = self.counts.get("beam_rows", 0) + len(tokens)
        return self.inner.step(parents, tokens, seqs, step)


@functools.lru_cache(maxsize=2)
def _trie(model: str) -> TitleTrie:
    setup = load(model)
    return TitleTrie(CatalogTitles.from_table(setup.tokens.titles), setup.tokens.prompt.eot)


class BeamCase:
    def __init__(self, model: str, plan: str, length: int):
        self.setup = load(model)
        users = long_users(self.setup.dataset, USERS, max(LENGTHS))
        self.samples = user_samples(self.setup.dataset, users, length)
        self.plan, self.length = plan, length
        self.trie = _trie(model)
        self.rows = [self.pack(u).num_rows for u in range(USERS)]

    def pack(self, user: int):
        return pack(self.setup, self.samples, np.array([user]), self.plan, self.length, answer=False)

    def decoder(self, provider: str, user: int) -> BeamDecoder:
        setup = self.setup
        if provider == "patchrec":
            return PackedBeamDecoder(setup.model, self.pack(user))
        if provider == "hf-cache":
            return HFCacheDecoder(setup.hf, bag_rows(setup.hf.get_input_embeddings().weight, self.pack(user)))
        one = np.array([user])
        inputs = authors.uncompressed(setup, self.samples, one, self.length, answer=False, left=True)
        if self.plan == "vanilla":
            return NoCacheDecoder(setup.hf, setup.hf.get_input_embeddings()(inputs[0]))
        embeds, _, _ = authors.compressed(setup.hf.get_input_embeddings(), inputs[0], inputs[1], None,
                                          setup.tokens.prompt, self.plan, PLANS["pft-i"]["k"],
                                          PLANS["pft-s"]["g"], left=True)  # fmt: skip
        return NoCacheDecoder(setup.hf, embeds)

    def rank(self, provider: str, counts: dict | None = None) -> list:
        out = []
        with torch.inference_mode():
            for user in range(USERS):
                decoder = self.decoder(provider, user)
                if counts is not None:
                    decoder = Counting(decoder, counts)
                out.append(search(decoder, self.trie, beams=BEAMS, groups=BEAMS, diversity=0.8)[0])
        sync()
        return out


def check_same(got: list, expected: list) -> None:
    for mine, theirs in zip(got, expected, strict=True):
        assert [u for u, _ in mine] == [u for u, _ in theirs]
        torch.testing.assert_close(torch.tensor([s for _, s in mine]), torch.tensor([s for _, s in theirs]),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_peers_beam(benchmark, model, plan, length, provider):
    if provider == "authors-nocache" and model != "tiny":
        pytest.skip("the authors' uncached generation takes minutes per beam step on a CPU with SmolLM2")
    before = machine_info()
    case = BeamCase(model, plan, length)
    case.setup.reset_hf()
    counts: dict = {}
    expected = case.rank("patchrec")
    check_same(case.rank(provider, counts), expected)  # also the warm-up round

    benchmark.group = f"peers_beam-{model}"
    benchmark.pedantic(lambda: case.rank(provider), rounds=ROUNDS, warmup_rounds=0, iterations=1)
    median = measured_seconds(benchmark)
    benchmark.extra_info.update(
        provider=provider, plan=plan, L=length, users=USERS, beams=BEAMS, prompt_rows=sum(case.rows),
        steps=counts.get("steps", 0), beam_rows=counts.get("beam_rows", 0), median_s=median,
        min_s=measured_seconds(benchmark, "min"), latency_per_user_s=median / USERS,
        min_latency_per_user_s=measured_seconds(benchmark, "min") / USERS, **case.setup.info(),
        load_average_before=before["load_average_1min"],
        load_average_after=machine_info()["load_average_1min"],
        cores=before["cores"], threads=before["threads"],
    )  # fmt: skip
