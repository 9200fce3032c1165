"""Prefill (the prompt's forward pass and the first answer token's distribution), patchrec against
transformers and the authors' evaluation code, side by side in one run, on real ML-1M users.

Cases: model (tiny preset, SmolLM2-135M) x plan (vanilla, PFT-I k=5, PFT-S g=5) x history length L (20, 50,
100, 350: the latest L items before each user's last one) x provider, ``USERS`` users per call:
- ``patchrec``: ``pack_batch`` -> ``encode_prompts`` (what ranking runs: every layer's keys/values kept for
  the continuations, the head on each prompt's last row);
- ``hf-packed``: transformers' own packing (rows as ``inputs_embeds`` [1, R], restarting ``position_ids``,
  ``use_cache=False``, no mask), the head on the last rows; it keeps no cache: transformers packs only
  without one, so a ranking would have to run the prompt again;
- ``hf-padded``: left padding (what batched generation needs), positions from the mask, the KV cache kept
  (``DynamicCache``), the head on the last position (``logits_to_keep=1``);
- ``hf-naive``: the same left-padded call with the head at every position (a plain ``model(**inputs)``);
- ``authors-loop``: the authors' evaluation collator and the first forward of their ``generate``
  (``authors.eval_prefill``: the whole uncompressed batch embedded, the per-item loop, no cache).
Every provider's first-token log-probs are checked equal to patchrec's before timing.

``extra_info``: min and median seconds per call, per user, prompt rows (packed) and positions run, peak
memory (``machine.measure_peak``), the model, load average before and after.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from machine import measure_peak, measured_seconds, sync
from peers import (
    MODELS,
    PLANS,
    available,
    bag_rows,
    last_rows,
    load,
    long_users,
    machine_info,
    pack,
    user_samples,
)

if available():
    pytest.skip(available(), allow_module_level=True)

import authors  # noqa: E402

from patchrec.eval.exact import encode_prompts  # noqa: E402

USERS = int(os.environ.get("PATCHREC_PEER_USERS", 2))
ROUNDS = int(os.environ.get("PATCHREC_PEER_ROUNDS", 5))
LENGTHS = [20, 50, 100, 350]
PROVIDERS = ["patchrec", "hf-packed", "hf-padded", "hf-naive", "authors-loop"]


class PrefillCase:
    def __init__(self, model: str, plan: str, length: int):
        self.setup = load(model)
        users = long_users(self.setup.dataset, USERS, max(LENGTHS))  # the same users at every L
        self.samples = user_samples(self.setup.dataset, users, length)
        self.ids = np.arange(USERS)
        self.plan, self.length = plan, length
        batch = self.pack()
        self.rows, self.longest = batch.num_rows, int(batch.cu_seqlens.diff().max())
        self.authors_inputs = authors.uncompressed(self.setup, self.samples, self.ids, length, answer=False,
                                                   left=True)  # fmt: skip

    def pack(self):
        return pack(self.setup, self.samples, self.ids, self.plan, self.length, answer=False)


def _logprobs(hf, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hf.lm_head(hidden).float(), dim=-1)


def patchrec_prefill(case: PrefillCase) -> torch.Tensor:
    return encode_prompts(case.setup.model, case.pack()).first_logprobs


def hf_packed_prefill(case: PrefillCase) -> torch.Tensor:
    hf, batch = case.setup.hf, case.pack()
    rows = bag_rows(hf.get_input_embeddings().weight, batch)
    out = hf.model(inputs_embeds=rows[None], position_ids=batch.position_ids[None], use_cache=False)
    return _logprobs(hf, out.last_hidden_state[0].index_select(0, last_rows(batch)))


def _left_padded(case: PrefillCase):
    hf, batch = case.setup.hf, case.pack()
    rows = bag_rows(hf.get_input_embeddings().weight, batch)
    lengths = batch.cu_seqlens.diff().long()
    seq = torch.repeat_interleave(torch.arange(batch.num_sequences), lengths)
    column = batch.position_ids + (case.longest - lengths)[seq]
    embeds = rows.new_zeros(batch.num_sequences, case.longest, rows.shape[1]).index_put((seq, column), rows)
    mask = (torch.arange(case.longest)[None] >= (case.longest - lengths)[:, None]).long()
    return hf, embeds, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def hf_padded_prefill(case: PrefillCase) -> torch.Tensor:
    hf, embeds, mask, positions = _left_padded(case)
    out = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             logits_to_keep=1)  # fmt: skip
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def hf_naive_prefill(case: PrefillCase) -> torch.Tensor:
    hf, embeds, mask, positions = _left_padded(case)
    out = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def authors_prefill(case: PrefillCase) -> torch.Tensor:
    return authors.eval_prefill(case.setup.hf, case.authors_inputs, case.setup.tokens.prompt, case.plan,
                                PLANS["pft-i"]["k"], PLANS["pft-s"]["g"])  # fmt: skip


PREFILLS = {"patchrec": patchrec_prefill, "hf-packed": hf_packed_prefill, "hf-padded": hf_padded_prefill,
            "hf-naive": hf_naive_prefill, "authors-loop": authors_prefill}  # fmt: skip


def positions(provider: str, case: PrefillCase) -> int:
    if provider in ("patchrec", "hf-packed"):
        return case.rows
    if provider == "authors-loop" and case.plan == "vanilla":
        return int(case.authors_inputs[0].numel())
    return USERS * case.longest


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_peers_prefill(benchmark, model, plan, length, provider):
    before = machine_info()
    case = PrefillCase(model, plan, length)
    case.setup.reset_hf()
    prefill = PREFILLS[provider]
    with torch.inference_mode():  # the same first-token distribution as patchrec's, checked before timing
        torch.testing.assert_close(prefill(case), patchrec_prefill(case), rtol=1e-4, atol=1e-4)

    def run():
        with torch.inference_mode():
            prefill(case)
        sync()

    benchmark.group = f"peers_prefill-{model}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    peak, method = measure_peak(run)
    median = measured_seconds(benchmark)
    benchmark.extra_info.update(
        provider=provider, plan=plan, L=length, users=USERS, prompt_rows=case.rows,
        positions=positions(provider, case), min_s=measured_seconds(benchmark, "min"), median_s=median,
        latency_per_user_s=median / USERS, peak_mem_bytes=int(peak), peak_mem_method=method,
        **case.setup.info(), load_average_before=before["load_average_1min"],
        load_average_after=machine_info()["load_average_1min"], cores=before["cores"],
        threads=before["threads"],
    )  # fmt: skip
