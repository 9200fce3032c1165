"""Per-user inference latency and per-user state bytes vs history length (issue 11): full history, PerSRec
with a cached state, and PFT-S, on one user whose history is ``n`` random ML-1M items, n in HISTORY.

LLM group ``persrec_llm`` (tiny preset on CPU / Llama-3.2-1B shapes on CUDA, random weights, Llama-3
tokenizer, ML-1M titles): the prompt's prefill up to the first answer-token distribution
(``patchrec.eval.exact.encode_prompts``: what exact ranking and beam search start from).
- ``vanilla``: the whole history as text; its state is the prompt's KV cache (every row).
- ``pft-s``: session patches of G items (the newest G as text); state = its KV cache.
- ``persrec``: segments of SEGMENT items as item patches + K T tokens, the newest 1..SEGMENT items as
  text. The state (prefix + T rows, every layer) is built before the timer, as a server holds it; the timer
  covers the final block (recent items + suffix) against it. State = prefix + S x K rows.
ID group ``persrec_id`` (SASRec, 2 blocks, d = 64): whole-catalog scores after the history; ``full`` reads
all n items (its state would be all n rows' keys/values), ``persrec`` answers from the cached state.

``extra_info``: state_bytes (keys + values of every layer, the model's dtype), state_rows, prompt rows.
Timer: one thread on CPU (see conftest), median of the rounds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from machine import DEVICE, DTYPE, HAS_CUDA, PRESET, SHARED, device_name, measured_seconds, sync

DATA = SHARED / "data" / "patchrec" / "ml-1m"
TOKENIZER = SHARED / "tokenizers" / "llama3"
if not (DATA.exists() and TOKENIZER.exists()):
    pytest.skip(f"{SHARED} (ML-1M release, Llama-3 tokenizer) not available", allow_module_level=True)

from patchrec.batching.pack import pack_batch  # noqa: E402
from patchrec.batching.plan import make_planner  # noqa: E402
from patchrec.data.dataset import Dataset, Samples  # noqa: E402

HISTORY = [100, 500, 1000, 2000, 5000]
SEGMENT, TOKENS, GROUP = 50, 4, 20
LLM_CASES = [(m, n) for n in HISTORY for m in ("vanilla", "pft-s", "persrec")]
ID_CASES = [(m, n) for n in HISTORY for m in ("full", "persrec")]


def _rounds(n: int) -> int:
    return 3 if HAS_CUDA or n <= 1000 else 1


@pytest.fixture(scope="module")
def llm_setup():
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.release import load_release
    from patchrec.model.decoder import PackedLlama

    base = load_release(DATA)
    tokens = tokenize_dataset(load_tokenizer(TOKENIZER), base, persrec_tokens=TOKENS)
    model = PackedLlama.from_preset(PRESET, tokens.vocab_size, seed=0).to(DEVICE, DTYPE).eval()
    return base, tokens, model


def one_user(base: Dataset, n: int, seed: int = 0) -> Samples:
    """A dataset of one user with ``n`` seeded random items and a target; its single sample reads them all."""
    items = np.random.default_rng(seed).integers(0, base.num_items, size=n + 1).astype(np.int32)
    ranges = {s: np.array([[-1, -1]], dtype=np.int64) for s in ("train", "val")}
    ranges["test"] = np.array([[n, n]], dtype=np.int64)
    ds = Dataset(base.name, base.titles, items, np.array([0, n + 1]), np.array([0]), ranges,
                 base.system_prompt, base.user_prompt)  # fmt: skip
    return Samples(ds, "test", n, np.array([0], np.int32), np.array([0]), np.array([n]))


def kv_row_bytes(model) -> int:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(DTYPE).bits // 8


@pytest.mark.parametrize("method,n", LLM_CASES, ids=[f"{m}-{n}" for m, n in LLM_CASES])
def test_llm_prefill(benchmark, llm_setup, method, n):
    from patchrec.eval.exact import encode_prompts
    from patchrec.persrec.llm import encode_final, split_state

    base, tokens, model = llm_setup
    samples = one_user(base, n)
    planner = make_planner(method, k=GROUP, g=GROUP, segment=SEGMENT, tokens=TOKENS)
    plans = planner.plan_batch(samples.history_lengths, width=n)
    persrec = (SEGMENT, TOKENS) if method == "persrec" else None
    batch = pack_batch(samples, np.arange(1), plans, tokens, answer=False, persrec=persrec).to(DEVICE)
    with torch.inference_mode():
        if method == "persrec":
            state, embeds, positions, final_rows = split_state(model, batch)
            state_rows = int(state.rows().sum())
            lengths, ids = batch.cu_seqlens.diff().long(), batch.sample_ids

            def run():
                with torch.inference_mode():
                    encode_final(model, state, embeds, positions, final_rows, lengths=lengths, sample_ids=ids)
                sync()
        else:
            state_rows = batch.num_rows

            def run():
                with torch.inference_mode():
                    encode_prompts(model, batch)
                sync()

    benchmark.group = "persrec_llm"
    benchmark.pedantic(run, rounds=_rounds(n), warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        method=method, history_items=n, prompt_rows=batch.num_rows, state_rows=state_rows,
        state_bytes=state_rows * kv_row_bytes(model), latency_s=measured_seconds(benchmark),
        segment=SEGMENT if method == "persrec" else None, tokens=TOKENS if method == "persrec" else None,
        group_size=GROUP if method == "pft-s" else None, preset=PRESET,
        dtype=str(DTYPE).removeprefix("torch."), device=device_name(),
    )  # fmt: skip


@pytest.mark.parametrize("method,n", ID_CASES, ids=[f"{m}-{n}" for m, n in ID_CASES])
def test_id_scores(benchmark, llm_setup, method, n):
    from patchrec.baselines import SASRec, SASRecConfig
    from patchrec.baselines.train import cu_seqlens_of
    from patchrec.persrec.sequence import fold_segments, recent_hidden, split_history

    base = llm_setup[0]
    tokens = TOKENS if method == "persrec" else 0
    config = SASRecConfig(max_len=n, dropout=0.0, persrec_tokens=tokens, persrec_segment=SEGMENT)
    torch.manual_seed(0)
    model = SASRec(base.num_items, config).to(DEVICE).eval()
    items = torch.from_numpy(one_user(base, n).history(0).astype(np.int64)).to(DEVICE)
    lengths = np.array([n])
    if method == "persrec":
        old, recent = split_history(lengths, SEGMENT)
        with torch.inference_mode():
            state = fold_segments(model, None, items[: old[0]], old)
        state_rows, state_bytes = int(state.rows()[0]), int(state.nbytes()[0])

        def run():
            with torch.inference_mode():
                model.logits(recent_hidden(model, state, items[old[0] :], recent))
            sync()
    else:
        cu = cu_seqlens_of(lengths).to(DEVICE)
        state_rows = n
        state_bytes = n * 2 * config.num_blocks * config.hidden * 4

        def run():
            with torch.inference_mode():
                model.logits(model(items, cu, n)[-1:])
            sync()

    benchmark.group = "persrec_id"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        method=method, history_items=n, state_rows=state_rows, state_bytes=state_bytes,
        latency_s=measured_seconds(benchmark), model="sasrec", device=device_name(),
    )  # fmt: skip
