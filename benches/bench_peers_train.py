"""One training step (pack, forward, backward, gradient clipping, AdamW), patchrec against what a capable
transformers user would run and against the authors' code, side by side in one run, on real ML-1M samples.

Cases: model (``peers.MODELS``: tiny preset, SmolLM2-135M) x plan (vanilla, PFT-I k=5, PFT-S g=5) x history
length L (20, 50, 100) x provider:
- ``patchrec``: ``pack_batch`` -> ``PackedDecoder`` (``patch_embed`` rows, varlen attention, the output head
  on the answer rows only);
- ``hf-packed``: transformers' own packing: the same packed rows (``F.embedding_bag``) as ``inputs_embeds``
  [1, R] with ``position_ids`` restarting per sample, ``use_cache=False`` and no attention mask (transformers
  then builds a block-diagonal mask for sdpa, or runs varlen flash-attention), the head on the answer rows;
- ``hf-padded``: the same rows right-padded to [Q, longest, D] with an attention mask, the head on the answer
  rows;
- ``hf-naive``: ``hf-padded`` with ``labels``: full-vocabulary logits at every position, as a stock
  transformers training step computes them (the old "hf-padded" baseline);
- ``authors-loop``: the released trainers' step (``authors.py``: per-sample Python loop over items, full
  logits).
Every provider uses the same weights, samples, plan, loss (mean cross-entropy over the answer tokens), the
training loop's AdamW (``make_adamw``, foreach) and clipping (0.3). Its loss is checked equal to patchrec's
before it is timed; its packing or input building is inside the timed step (tokenisation is not).

``extra_info``: min and median seconds, packed rows and the padded positions each provider runs, samples
per second, the step's peak memory (``machine.measure_peak``: on CPU the RSS above the level before the
step, sampled every millisecond, after the optimizer state exists), the model, and the machine's load
average before and after the case. ``PATCHREC_PEER_BATCH`` samples per step (default 4),
``PATCHREC_PEER_ROUNDS`` rounds (default 5) after one warm-up round, one intra-op thread on CPU.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from machine import measure_peak, measured_seconds, sync
from peers import MODELS, PLANS, available, bag_rows, load, machine_info, pack, padded, train_ids

if available():
    pytest.skip(available(), allow_module_level=True)

import authors  # noqa: E402

from patchrec.data.dataset import make_samples  # noqa: E402
from patchrec.train.config import TrainConfig  # noqa: E402
from patchrec.train.parallel import make_adamw, param_groups  # noqa: E402

BATCH = int(os.environ.get("PATCHREC_PEER_BATCH", 4))
ROUNDS = int(os.environ.get("PATCHREC_PEER_ROUNDS", 5))
LENGTHS = [20, 50, 100]
PROVIDERS = ["patchrec", "hf-packed", "hf-padded", "hf-naive", "authors-loop"]
GRAD_CLIP = TrainConfig.grad_clip  # the training loop's default


@functools.lru_cache(maxsize=4)
def _samples(model: str, length: int):
    return make_samples(load(model).dataset, "train", max_items=length)


class TrainCase:
    """BATCH training samples with >= L history items (seeded), under one plan."""

    def __init__(self, model: str, plan: str, length: int):
        self.setup = load(model)
        self.samples = _samples(model, length)
        self.ids = train_ids(self.samples, length, BATCH)
        self.plan, self.length = plan, length
        batch = self.pack()
        self.rows = batch.num_rows
        self.width = int(batch.cu_seqlens.diff().max()) + 1  # + 1: the eot label sits past the last row
        self.labels = self._labels(batch)
        self.authors_inputs = authors.uncompressed(self.setup, self.samples, self.ids, length, answer=True)

    def pack(self):
        return pack(self.setup, self.samples, self.ids, self.plan, self.length, answer=True)

    def _labels(self, batch) -> torch.Tensor:
        shape = (batch.num_sequences, self.width)
        labels = torch.full(shape, -100, dtype=torch.long, device=batch.label_ids.device)
        # transformers shifts labels by one: the row at position p predicts labels[p + 1].
        labels[batch.label_sample, batch.position_ids[batch.label_rows] + 1] = batch.label_ids
        return labels


def patchrec_loss(case: TrainCase) -> torch.Tensor:
    return case.setup.model(case.pack(), validate=False).loss


def _head_loss(hf, hidden: torch.Tensor, batch) -> torch.Tensor:
    return F.cross_entropy(hf.lm_head(hidden).float(), batch.label_ids)


def hf_packed_loss(case: TrainCase) -> torch.Tensor:
    hf, batch = case.setup.hf, case.pack()
    rows = bag_rows(hf.get_input_embeddings().weight, batch)
    out = hf.model(inputs_embeds=rows[None], position_ids=batch.position_ids[None], use_cache=False)
    return _head_loss(hf, out.last_hidden_state[0].index_select(0, batch.label_rows), batch)


def hf_padded_loss(case: TrainCase) -> torch.Tensor:
    hf, batch = case.setup.hf, case.pack()
    embeds, mask = padded(bag_rows(hf.get_input_embeddings().weight, batch), batch, case.width)
    hidden = hf.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return _head_loss(hf, hidden[batch.label_sample, batch.position_ids[batch.label_rows]], batch)


def hf_naive_loss(case: TrainCase) -> torch.Tensor:
    hf, batch = case.setup.hf, case.pack()
    embeds, mask = padded(bag_rows(hf.get_input_embeddings().weight, batch), batch, case.width)
    return hf(inputs_embeds=embeds, attention_mask=mask, labels=case.labels, use_cache=False).loss


def authors_loss(case: TrainCase) -> torch.Tensor:
    return authors.train_loss(case.setup.hf, case.authors_inputs, case.setup.tokens.prompt, case.plan,
                              PLANS["pft-i"]["k"], PLANS["pft-s"]["g"])  # fmt: skip


LOSSES = {"patchrec": patchrec_loss, "hf-packed": hf_packed_loss, "hf-padded": hf_padded_loss,
          "hf-naive": hf_naive_loss, "authors-loop": authors_loss}  # fmt: skip


def positions(provider: str, case: TrainCase) -> int:
    """Rows the decoder runs: packed for patchrec and hf-packed, samples x longest for the padded ones."""
    if provider in ("patchrec", "hf-packed"):
        return case.rows
    if provider == "authors-loop" and case.plan == "vanilla":
        return int(case.authors_inputs[0].numel())
    return BATCH * (case.width - 1) if provider != "hf-naive" else BATCH * case.width


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("model", MODELS)
def test_peers_train_step(benchmark, model, plan, length, provider):
    before = machine_info()
    case = TrainCase(model, plan, length)
    case.setup.reset_hf()  # earlier cases stepped one of the two copies
    loss_fn = LOSSES[provider]
    with torch.no_grad():  # every provider computes patchrec's loss: checked before it is timed
        torch.testing.assert_close(loss_fn(case).float(), patchrec_loss(case).float(), rtol=1e-4, atol=1e-4)
    module = case.setup.model if provider == "patchrec" else case.setup.hf
    groups, _ = param_groups(module, 0.0)
    optimizer = make_adamw(groups, lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(case).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
        optimizer.step()
        sync()

    benchmark.group = f"peers_train_step-{model}"
    try:
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        peak, method = measure_peak(step)
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # 2 x parameters of AdamW state would outlive the case otherwise
    median = measured_seconds(benchmark)
    benchmark.extra_info.update(
        provider=provider, plan=plan, L=length, samples=BATCH, packed_rows=case.rows,
        positions=positions(provider, case), min_s=measured_seconds(benchmark, "min"), median_s=median,
        samples_per_s=BATCH / median, peak_mem_bytes=int(peak), peak_mem_method=method, **case.setup.info(),
        load_average_before=before["load_average_1min"],
        load_average_after=machine_info()["load_average_1min"],
        cores=before["cores"], threads=before["threads"],
    )  # fmt: skip
