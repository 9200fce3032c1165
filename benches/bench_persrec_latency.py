"""What serving one user costs, per new interaction and per recommendation request, against history length:
every method pays for what it must redo, nothing is built outside the timer that a server would have to build
per request.

For a user whose history is ``n`` random ML-1M items (seeded), two timed operations per method:

- ``interaction``: the work a new interaction causes (nothing but an append for methods that re-read the
  history at every request; a KV append; a refold; a fold pass);
- ``request``: the work of one recommendation request, up to the next-item distribution (the LLM: the
  first answer token's log-probabilities, where exact ranking and beam search start; SASRec: the catalog
  scores).

LLM methods (tiny preset on CPU / Llama-3.2-1B shapes on CUDA, random weights, Llama-3 tokenizer):

- ``full``: the whole history as text, the prompt re-prefilled at each request (up to 5,000 items);
- ``vanilla-kv``: the same prompt with its KV cache kept: an interaction appends the new title's rows to the
  cache, a request runs only the prompt suffix against it (state: every row's keys/values);
- ``pft-s``: session patches of G = 20 (the newest 20 as text), re-prefilled at each request;
- ``persrec-window``: PerSRec's paper layout, P = 350 old items -> k = 4 tokens, R = 50 recent items as text;
  a request reads the recent block against the state; an interaction costs a refold of the state (the old
  window slides) when it is due, every m interactions (the table reports the refold itself);
- ``persrec-rolling``: PerSRec's bounded layout, segments of N = 50, k = 4; a request reads the open segment
  against the memory; every N-th interaction folds a segment (the table reports the fold pass itself).

SASRec (2 blocks, d = 64): ``full`` (the whole history), ``persrec-window``, ``persrec-rolling`` (as above).

``extra_info``: method, op, history items, state bytes (what a server keeps per user), rows processed, and
the machine. Timings: one thread on CPU (conftest), at least 5 rounds (3 where a round takes over a minute),
min and median from the JSON. Run it alone on the machine:

    python -m pytest benches/bench_persrec_latency.py \
        --benchmark-json=benches/results/persrec-latency-cpu.json
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch
from machine import DEVICE, DTYPE, PRESET, SHARED, device_name, sync

DATA = SHARED / "data" / "patchrec" / "ml-1m"
TOKENIZER = SHARED / "tokenizers" / "llama3"
if not (DATA.exists() and TOKENIZER.exists()):
    pytest.skip(f"{SHARED} (ML-1M release, Llama-3 tokenizer) not available", allow_module_level=True)

from patchrec.batching.pack import Packer, pack_batch  # noqa: E402
from patchrec.batching.plan import make_planner  # noqa: E402
from patchrec.data.dataset import history_samples  # noqa: E402
from patchrec.model.attention import BlockPlan  # noqa: E402

HISTORY = [100, 500, 1000, 2000, 5000, 10000]
FULL_LIMIT = 5000  # re-prefilling the whole text history beyond this takes minutes a round
WINDOW, RECENT, SEGMENT, TOKENS, GROUP = 350, 50, 50, 4, 20
LLM_METHODS = ("full", "vanilla-kv", "pft-s", "persrec-window", "persrec-rolling")
LLM_CASES = [(m, op, n) for n in HISTORY for m in LLM_METHODS for op in ("interaction", "request")
             if not (m in ("full", "pft-s") and op == "interaction") and not (m == "full" and n > FULL_LIMIT)]
ID_METHODS = ("full", "persrec-window", "persrec-rolling")
ID_CASES = [(m, op, n) for n in HISTORY for m in ID_METHODS for op in ("interaction", "request")
            if not (m == "full" and op == "interaction")]  # fmt: skip


def machine() -> dict:
    return {"device": device_name(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
            "torch": torch.__version__}  # fmt: skip


def timed(benchmark, run, seconds_hint: float) -> None:
    rounds = 3 if seconds_hint > 60 else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1 if seconds_hint < 60 else 0, iterations=1)


@pytest.fixture(scope="module")
def llm():
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.release import load_release
    from patchrec.model.decoder import PackedDecoder

    base = load_release(DATA)
    tokens = tokenize_dataset(load_tokenizer(TOKENIZER), base, persrec_tokens=TOKENS)
    model = PackedDecoder.from_preset(PRESET, tokens.vocab_size, seed=0).to(DEVICE, DTYPE).eval()
    return base, tokens, model


def history(base, n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, base.num_items, size=n + 1)


def kv_row_bytes(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(DTYPE).bits // 8


def prompt(base, tokens, items: np.ndarray, planner):
    samples = history_samples(base, [items])
    (plans,) = planner.plan_batch(samples.history_lengths)
    batch = pack_batch(samples, np.arange(1), (plans,), tokens, answer=False, persrec=planner.persrec)
    return batch.to(DEVICE)


def prefill(model, batch):
    hidden = model.decode(model.embed(batch), batch.position_ids, model.batch_plan(batch))
    return model.logprobs(hidden[-1:])


def append_rows(model, rows, start: int, cache, keep: bool):
    """Rows [r, D] at positions start.. against a per-layer K/V cache; returns (hidden, new cache)."""
    r = rows.shape[0]
    c = 0 if cache is None else cache[0][0].shape[0]
    cu_q = torch.tensor([0, r], dtype=torch.int32, device=rows.device)
    cu_k = torch.tensor([0, c + r], dtype=torch.int32, device=rows.device)
    plan = BlockPlan(cu_q, r, cu_k, c + r, None, None if cache is None else cache[0],
                     None if cache is None else cache[1], keep=True if keep else None)  # fmt: skip
    positions = torch.arange(start, start + r, device=rows.device)
    hidden = model.decode(rows, positions, plan)
    return hidden, ((plan.keys, plan.values) if keep else cache)


def vanilla_kv(model, tokens, batch):
    """The vanilla prompt's KV cache without its tail, built in chunks (a one-pass prefill of 50k rows would
    hold [rows, rows] scores on the CPU reference path)."""
    rows = model.embed(batch)
    history_rows = rows.shape[0] - Packer(tokens).tail_len
    cache = None
    for lo in range(0, history_rows, 2048):
        _, cache = append_rows(model, rows[lo : min(lo + 2048, history_rows)], lo, cache, keep=True)
    return rows[history_rows:], history_rows, cache


@pytest.mark.parametrize("method,op,n", LLM_CASES, ids=[f"{m}-{o}-{n}" for m, o, n in LLM_CASES])
def test_llm(benchmark, llm, method, op, n):
    from patchrec.persrec.llm import encode_final, split_state
    from patchrec.persrec.llm_user import RollingLLMUser

    base, tokens, model = llm
    items = history(base, n)
    info = {"rows": None, "state_bytes": None}
    with torch.inference_mode():
        if method in ("full", "pft-s"):
            planner = make_planner("vanilla" if method == "full" else "pft-s", k=GROUP, g=GROUP)
            batch = prompt(base, tokens, items[:n], planner)
            run = lambda: prefill(model, batch)  # noqa: E731
            info.update(rows=batch.num_rows, state_bytes=0)
        elif method == "vanilla-kv":
            batch = prompt(base, tokens, items[:n], make_planner("vanilla"))
            tail, start, cache = vanilla_kv(model, tokens, batch)
            if op == "request":
                run = lambda: model.logprobs(  # noqa: E731
                    append_rows(model, tail, start, cache, keep=False)[0][-1:]
                )
                info["rows"] = tail.shape[0]
            else:
                title = tokens.titles.title(int(items[n]))
                ids = torch.as_tensor(np.r_[tokens.prompt.item_sep, title], device=DEVICE)
                new = model.embed_tokens(ids)
                run = lambda: append_rows(model, new, start, cache, keep=True)  # noqa: E731
                info["rows"] = len(ids)
            info["state_bytes"] = start * kv_row_bytes(model)
        elif method == "persrec-window":
            planner = make_planner("persrec", tokens=TOKENS, layout="window", window=WINDOW, recent=RECENT)
            batch = prompt(base, tokens, items[max(0, n - WINDOW - RECENT) : n], planner)
            state, embeds, positions, final_rows = split_state(model, batch)
            lengths, ids = batch.cu_seqlens.diff().long(), batch.sample_ids
            if op == "request":
                run = lambda: encode_final(model, state, embeds, positions, final_rows, lengths=lengths,  # noqa: E731
                                           sample_ids=ids).first_logprobs  # fmt: skip
                info["rows"] = int(final_rows.sum())
            else:
                run = lambda: split_state(model, batch)  # noqa: E731
                info["rows"] = int(batch.num_rows - final_rows.sum())
            info["state_bytes"] = int(state.rows()[0]) * kv_row_bytes(model)
        else:
            planner = make_planner("persrec", tokens=TOKENS, layout="rolling", segment=SEGMENT)
            user = RollingLLMUser(model, tokens, base, planner, items[:n])
            if op == "request":
                batch = user.prompt_batch()
                run = lambda: prefill(model, batch)  # noqa: E731
                info["rows"] = batch.num_rows
            else:
                fold = Packer(tokens, answer=False).fold_pass(items[None, :SEGMENT], False, TOKENS).to(DEVICE)
                run = lambda: model.fold_pass(fold, user.memory)  # noqa: E731
                info["rows"] = fold.batch.num_rows
            info["state_bytes"] = user.state_bytes

    def timed_run():
        with torch.inference_mode():
            run()
        sync()

    benchmark.group = f"persrec_llm_{op}"
    timed(benchmark, timed_run, seconds_hint=100.0 if method == "full" and n >= 5000 else 1.0)
    benchmark.extra_info.update(method=method, op=op, history_items=n, preset=PRESET, window=WINDOW,
                                recent=RECENT, segment=SEGMENT, tokens=TOKENS, group_size=GROUP,
                                dtype=str(DTYPE).removeprefix("torch."), machine=machine(),
                                **info)  # fmt: skip


@pytest.mark.parametrize("method,op,n", ID_CASES, ids=[f"{m}-{o}-{n}" for m, o, n in ID_CASES])
def test_sasrec(benchmark, llm, method, op, n):
    from patchrec.baselines import SASRec, SASRecConfig
    from patchrec.baselines.train import cu_seqlens_of
    from patchrec.persrec.rolling import RollingState, rolling_fold, rolling_recent
    from patchrec.persrec.window import window_fold, window_recent

    base = llm[0]
    items = torch.from_numpy(history(base, n)).to(DEVICE)
    layout = {"full": {}, "persrec-window": dict(persrec_tokens=TOKENS, persrec_layout="window",
                                                 persrec_window=WINDOW, persrec_recent=RECENT),
              "persrec-rolling": dict(persrec_tokens=TOKENS, persrec_layout="rolling",
                                      persrec_segment=SEGMENT)}[method]  # fmt: skip
    max_len = n if method == "full" else WINDOW + RECENT
    torch.manual_seed(0)
    model = SASRec(base.num_items, SASRecConfig(max_len=max_len, dropout=0.0, **layout)).to(DEVICE).eval()
    d, blocks = model.config.hidden, model.config.num_blocks
    with torch.inference_mode():
        if method == "full":
            cu = cu_seqlens_of(np.array([n])).to(DEVICE)
            run = lambda: model.logits(model(items[:n], cu, n)[-1:])  # noqa: E731
            state_bytes = n * 2 * blocks * d * 4  # what a KV cache of the history would hold
        elif method == "persrec-window":
            recent = min(n, RECENT)
            old = min(n - recent, WINDOW)
            window = items[n - recent - old : n - recent]
            state = window_fold(model, window, np.array([old]))
            if op == "request":
                run = lambda: model.logits(  # noqa: E731
                    window_recent(model, state, items[n - recent : n], np.array([recent]))
                )
            else:
                run = lambda: window_fold(model, window, np.array([old]))  # noqa: E731
            state_bytes = int(state.nbytes()[0])
        else:
            folded = (n - 1) // SEGMENT * SEGMENT
            state = rolling_fold(model, None, items[:folded], np.array([folded]))
            if op == "request":
                run = lambda: model.logits(  # noqa: E731
                    rolling_recent(model, state, items[folded:n], np.array([n - folded]))
                )
            else:
                one = RollingState(state.memory, state.folded)
                run = lambda: rolling_fold(model, one, items[:SEGMENT], np.array([SEGMENT]))  # noqa: E731
            state_bytes = int(state.nbytes()[0])

    def timed_run():
        with torch.inference_mode():
            run()
        sync()

    benchmark.group = f"persrec_id_{op}"
    timed(benchmark, timed_run, seconds_hint=1.0)
    benchmark.extra_info.update(method=method, op=op, history_items=n, model="sasrec", window=WINDOW,
                                recent=RECENT, segment=SEGMENT, tokens=TOKENS, state_bytes=state_bytes,
                                machine=machine())  # fmt: skip
