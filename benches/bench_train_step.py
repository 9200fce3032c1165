"""One training step (forward + backward + AdamW step) on real ML-1M histories: patchrec's packed path against
the two ways one would otherwise feed compressed histories to a transformers Llama.

Providers (same weights, same samples, same plan, same loss = mean cross-entropy over the answer tokens):
- ``patchrec``: ``pack_batch`` -> ``PackedLlama`` (patch_embed rows, varlen attention, output head on the
  answer rows only) -> backward -> AdamW step.
- ``hf-padded``: ``pack_batch``, then the input rows built vectorised (one ``F.embedding_bag`` over the
  packed rows, the fastest plain-PyTorch form, see ``bench_patch_embed``) and scattered into a right-padded
  ``[B, longest + 1, D]`` ``inputs_embeds`` (the extra column holds the end-of-turn label), then transformers'
  ``LlamaForCausalLM`` with ``attn_implementation="sdpa"``, an attention mask and ``labels`` (-100 outside the
  answer): full ``[B, W, V]`` logits, as a stock HF trainer computes them. Packing and the embedding build are
  inside the timed region, as patchrec's are.
- ``authors-loop``: the released trainer's data path: per sample, a Python loop taking
  ``weight[ids].mean(0)`` per title (a session: the mean of its titles' means), ``weight[ids]`` for runs of
  text tokens, ``torch.cat``, then padding to the longest sample, into the same model and loss as
  ``hf-padded``. The per-sample id tensors are made before timing (a collator's work); the loop is timed.
  Its backward is slow by construction: every per-title gather's backward writes a dense [V, D] gradient.

History items consumed per second (``items_per_s`` = samples x L / median) and the step's peak memory go to
``extra_info``. Peak memory: on CUDA ``max_memory_allocated`` during one extra step minus the allocation
before it (weights, gradients of the previous step freed, optimizer state already made); on CPU the same
delta of the process RSS, sampled every millisecond by a thread reading ``/proc/self/statm`` (a fresh
process per case would cost a tokenizer + dataset load each; torch's CPU allocator returns large blocks to the
OS, so RSS follows live tensors). Both are labelled in ``peak_mem_method``.

Shapes: CUDA: Llama-3.2-1B shapes (random weights), bf16, 16 samples per batch (``PATCHREC_BENCH_BATCH``
overrides; 64 does not fit the hf-padded full logits at L = 200 in 80 GB), L in {20, 50, 100, 200}. CPU: the
tiny preset with the Llama-3 vocabulary, 4 samples, L in {20, 50, 100}, 2 rounds (authors-loop 1),
one intra-op thread (see ``one_thread``).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from machine import DEVICE, DTYPE, HAS_CUDA, PRESET, SHARED, device_name, measure_peak, measured_seconds, sync

DATA = SHARED / "data" / "patchrec" / "ml-1m"
TOKENIZER = SHARED / "tokenizers" / "llama3"
if not (DATA.exists() and TOKENIZER.exists()):
    pytest.skip(f"{SHARED} (ML-1M release, Llama-3 tokenizer) not available", allow_module_level=True)

from patchrec.batching.pack import pack_batch  # noqa: E402
from patchrec.batching.plan import make_planner  # noqa: E402
from patchrec.model.decoder import PackedLlama  # noqa: E402
from patchrec_kernels.patch_embed import token_scale  # noqa: E402

BATCH = int(os.environ.get("PATCHREC_BENCH_BATCH", 16 if HAS_CUDA else 4))
LENGTHS = [20, 50, 100, 200] if HAS_CUDA else [20, 50, 100]
ROUNDS = 5 if HAS_CUDA else 2
PLANS = {"vanilla": dict(name="vanilla"), "pft-i": dict(name="pft-i", k=5), "pft-s": dict(name="pft-s", g=5)}
PROVIDERS = ["patchrec", "hf-padded", "authors-loop"]
GROUP = "train_step"





@pytest.fixture(scope="module")
def ml1m():
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.release import load_release

    dataset = load_release(DATA)
    return dataset, tokenize_dataset(load_tokenizer(TOKENIZER), dataset)


@pytest.fixture(scope="module")
def models(ml1m):
    """(PackedLlama, the same weights as a plain sdpa LlamaForCausalLM)."""
    _, tokens = ml1m
    packed = PackedLlama.from_preset(PRESET, tokens.vocab_size, seed=0).to(DEVICE, DTYPE)
    hf = copy.deepcopy(packed.lm)
    hf.set_attn_implementation("sdpa")
    return packed, hf


class Case:
    """BATCH real training samples with >= L history items (latest L kept), planned and packed once on the
    host for the baselines' index structures; patchrec re-packs inside its timed step."""

    def __init__(self, ml1m, plan: str, length: int):
        from patchrec.data.dataset import make_samples

        dataset, self.tokens = ml1m
        self.samples = make_samples(dataset, "train", max_items=length)
        eligible = np.flatnonzero(self.samples.history_lengths >= length)
        rng = np.random.default_rng(0)
        self.ids = np.sort(rng.choice(eligible, size=BATCH, replace=False))
        self.plan, self.length = plan, length
        self.planner = make_planner(**PLANS[plan])
        self.plans = self.planner.plan_batch(self.samples.history_lengths[self.ids], width=length)
        batch = self.pack()
        self.num_rows, self.num_tokens = batch.num_rows, int(batch.token_ids.numel())
        self.lengths = batch.cu_seqlens.diff().long()
        self.width = int(self.lengths.max()) + 1  # + 1: the end-of-turn label sits one past the last row
        self.pieces = self._pieces(batch)
        self.mask, self.labels = self._mask_labels(batch)

    def pack(self):
        return pack_batch(self.samples, self.ids, self.plans, self.tokens).to(DEVICE)

    def _pieces(self, batch) -> list[list[tuple[str, object]]]:
        """Per sample, its rows as ("text", ids of a run of one-token rows) / ("patch", [title ids, ...])."""
        tok = batch.token_ids.long().cpu().numpy()
        seg = batch.seg_offsets.cpu().numpy()
        row = batch.row_offsets.cpu().numpy()
        cu = batch.cu_seqlens.cpu().numpy()
        as_ids = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64, device=DEVICE)
        out = []
        for q in range(len(cu) - 1):
            pieces, run = [], []
            for r in range(cu[q], cu[q + 1]):
                segs = range(row[r], row[r + 1])
                if len(segs) == 1 and seg[row[r] + 1] - seg[row[r]] == 1:
                    run.append(tok[seg[row[r]]])
                    continue
                if run:
                    pieces.append(("text", as_ids(run)))
                    run = []
                pieces.append(("patch", [as_ids(tok[seg[s] : seg[s + 1]]) for s in segs]))
            if run:
                pieces.append(("text", as_ids(run)))
            out.append(pieces)
        return out

    def _mask_labels(self, batch):
        q = batch.num_sequences
        mask = (torch.arange(self.width, device=DEVICE)[None] < self.lengths[:, None]).long()
        labels = torch.full((q, self.width), -100, dtype=torch.long, device=DEVICE)
        # HF shifts labels by one: the row at position p predicts labels[p + 1].
        labels[batch.label_sample, batch.position_ids[batch.label_rows] + 1] = batch.label_ids
        return mask, labels


def _patchrec_loss(model: PackedLlama, case: Case) -> torch.Tensor:
    return model(case.pack(), validate=False).loss


def _hf_padded_loss(hf, case: Case) -> torch.Tensor:
    batch = case.pack()
    weight = hf.get_input_embeddings().weight
    scale = token_scale(batch.seg_offsets, batch.row_offsets, batch.token_ids.numel()).to(weight.dtype)
    bags = batch.seg_offsets[batch.row_offsets[:-1]]
    rows = F.embedding_bag(batch.token_ids.long(), weight, bags, mode="sum", per_sample_weights=scale)
    seq = torch.repeat_interleave(torch.arange(batch.num_sequences, device=DEVICE), case.lengths)
    padded = rows.new_zeros(batch.num_sequences, case.width, rows.shape[1])
    padded = padded.index_put((seq, batch.position_ids), rows)
    return hf(inputs_embeds=padded, attention_mask=case.mask, labels=case.labels, use_cache=False).loss


def _authors_loop_loss(hf, case: Case) -> torch.Tensor:
    weight = hf.get_input_embeddings().weight
    embeds = []
    for pieces in case.pieces:
        parts = []
        for kind, ids in pieces:
            if kind == "text":
                parts.append(weight[ids])
            elif len(ids) == 1:
                parts.append(weight[ids[0]].mean(0, keepdim=True))
            else:
                parts.append(torch.stack([weight[t].mean(0) for t in ids]).mean(0, keepdim=True))
        embeds.append(torch.cat(parts))
    embeds.append(weight.new_zeros(case.width, weight.shape[1]))  # pads every sample to the same width
    padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)[:-1]
    return hf(inputs_embeds=padded, attention_mask=case.mask, labels=case.labels, use_cache=False).loss


def _loss_fn(provider: str, models):
    packed, hf = models
    if provider == "patchrec":
        return packed, lambda case: _patchrec_loss(packed, case)
    if provider == "hf-padded":
        return hf, lambda case: _hf_padded_loss(hf, case)
    return hf, lambda case: _authors_loop_loss(hf, case)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("plan", list(PLANS))
def test_train_step(benchmark, ml1m, models, plan, length, provider):
    case = Case(ml1m, plan, length)
    model, loss_fn = _loss_fn(provider, models)
    # Earlier cases stepped one of the two copies: give both the same weights again.
    models[1].load_state_dict(models[0].lm.state_dict())

    # Every provider computes the same loss on the same weights; check it before timing it.
    try:
        with torch.no_grad():
            expected = _patchrec_loss(models[0], case).float()
            got = loss_fn(case).float()
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} {plan} L={length}: out of memory at {BATCH} samples per batch")
    tol = 3e-2 if DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(case).backward()
        optimizer.step()
        sync()

    benchmark.group = GROUP
    try:
        # On CPU the authors' loop costs seconds per step (dense [V, D] gradient per title): one round.
        rounds = 1 if provider == "authors-loop" and not HAS_CUDA else ROUNDS
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
        peak, method = measure_peak(step)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} {plan} L={length}: out of memory at {BATCH} samples per batch")
    finally:
        # The AdamW state (2 x parameters) would otherwise live until the closure is collected.
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
    median = measured_seconds(benchmark)
    padded = BATCH * case.width if provider != "patchrec" else case.num_rows
    benchmark.extra_info.update(
        provider=provider,
        plan=plan,
        L=length,
        samples=BATCH,
        items=BATCH * length,
        items_per_s=BATCH * length / median,
        positions=padded,
        packed_rows=case.num_rows,
        token_ids=case.num_tokens,
        peak_mem_bytes=int(peak),
        peak_mem_method=method,
        preset=PRESET,
        vocab=case.tokens.vocab_size,
        dtype=str(DTYPE).removeprefix("torch."),
        device=device_name(),
    )
