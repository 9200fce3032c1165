"""Long-history inference (the paper's Figure 8 setting): ML-1M users with more than 500 interactions, the
prompt holding their latest items before their last one (the target).

Cases (``plan`` / ``L`` = history items in the prompt):
- ``vanilla`` and ``pft-i`` (the latest 20 items as text, older ones as item patches) truncated to the same
  L in {150, 350};
- ``pft-s`` (G = 20) over the user's whole history (up to 1,435 items).

Two groups:
- ``inference_prefill``: the prompt's forward pass alone (``PackedLlama.hidden_states`` on the packed prompt,
  no answer rows): where the plans differ.
- ``inference_rank``: prompt prefill + whole-catalog exact ranking, ``patchrec.eval.evaluate.evaluate(...,
  ranking="exact")``: every distinct title scored as the answer from the prompt's cached keys/values. Its
  cost adds a catalog term that no plan changes (titles x title rows through the decoder and output head);
  on CPU with the tiny model that term dominates (~40 s a user), so only L = 350 and the full history run
  there, one round.

``extra_info`` also holds, per plan, the longest history that fits a stated budget, computed analytically from
rows per history item (text: mean Llama-3 title tokens + 1 separator; item patch: 2 = patch + separator;
session of G: 2 / G), the prompt's fixed rows and the plan's fixed text / patch items: ``BUDGET_BYTES`` of
KV cache per user at Llama-3.2-1B shapes in bf16 (2 x 16 layers x 8 KV heads x 64 dims x 2 bytes = 32 KiB
per row), i.e. 32,768 rows for 1 GiB.

CPU: tiny preset (Llama-3 vocabulary), the single longest user. CUDA: Llama-3.2-1B shapes, bf16, 2 users.
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
from patchrec.data.dataset import Samples  # noqa: E402
from patchrec.model.decoder import PackedLlama  # noqa: E402

USERS = 2 if HAS_CUDA else 1
MIN_INTERACTIONS = 500
TEXT_ITEMS, GROUP_SIZE = 20, 20
FULL = 0  # L marker: the whole history
CASES = [("vanilla", 150), ("vanilla", 350), ("pft-i", 150), ("pft-i", 350), ("pft-s", FULL)]
RANK_CASES = CASES if HAS_CUDA else [c for c in CASES if c[1] != 150]
BUDGET_BYTES = 1 << 30
KV_BYTES_PER_ROW = 2 * 16 * 8 * 64 * 2  # K and V x layers x KV heads x head dim x bf16, Llama-3.2-1B





def max_items_in_budget(plan: str, budget_rows: int, title_tokens: float, prompt_rows: int) -> int:
    """Longest history whose prompt fits ``budget_rows`` rows under ``plan`` (module docstring)."""
    free = budget_rows - prompt_rows
    text = title_tokens + 1
    if plan == "vanilla":
        return max(int(free // text), 0)
    if plan == "pft-i":
        free -= TEXT_ITEMS * text
        return TEXT_ITEMS + max(int(free // 2), 0) if free >= 0 else int((free + TEXT_ITEMS * text) // text)
    free -= GROUP_SIZE * text + 2 * GROUP_SIZE
    if free < 0:
        return max_items_in_budget("pft-i", budget_rows, title_tokens, prompt_rows)
    return 2 * GROUP_SIZE + GROUP_SIZE * int(free // 2)


@pytest.fixture(scope="module")
def setup():
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.release import load_release

    dataset = load_release(DATA)
    tokens = tokenize_dataset(load_tokenizer(TOKENIZER), dataset)
    lengths = np.diff(dataset.user_offsets)
    long_users = np.flatnonzero(lengths > MIN_INTERACTIONS)
    # The longest users first: the CPU run takes the single longest (1,435 items before its target).
    users = long_users[np.argsort(-lengths[long_users], kind="stable")][:USERS]
    model = PackedLlama.from_preset(PRESET, tokens.vocab_size, seed=0).to(DEVICE, DTYPE).eval()
    prompt = tokens.prompt
    prompt_rows = len(prompt.prefix) + len(prompt.suffix) + 2  # + <|start_seq|> and <|end_seq|>
    budget_rows = BUDGET_BYTES // KV_BYTES_PER_ROW
    budget = {
        "budget": f"{BUDGET_BYTES / 2**30:g} GiB KV cache per user, Llama-3.2-1B bf16 "
        f"({KV_BYTES_PER_ROW // 1024} KiB/row) = {budget_rows} rows",
        "budget_bytes": BUDGET_BYTES,
        "budget_rows": int(budget_rows),
        "prompt_fixed_rows": prompt_rows,
        "title_tokens_mean": tokens.avg_title_tokens,
    }
    return dataset, tokens, users, model, budget


def user_samples(dataset, users: np.ndarray, length: int) -> Samples:
    """One sample per user: target = the user's last item, history = the ``length`` items before it."""
    target = dataset.user_offsets[users + 1].astype(np.int64) - 1
    starts = dataset.user_offsets[users].astype(np.int64)
    hist_start = starts if length == FULL else np.maximum(target - length, starts)
    width = int((target - hist_start).max())
    return Samples(dataset, "test", width, users.astype(np.int32), hist_start, target)


def _planner(plan: str):
    return make_planner(plan, k=TEXT_ITEMS, g=GROUP_SIZE)


def _info(setup_, plan: str, samples: Samples, seconds: float, batch) -> dict:
    dataset, tokens, users, _, budget = setup_
    items = int(samples.history_lengths.sum())
    title_tokens = budget["title_tokens_mean"]
    rows_per_item = {"vanilla": title_tokens + 1, "pft-i": 2.0, "pft-s": 2.0 / GROUP_SIZE}[plan]
    return dict(
        provider="patchrec",
        plan=plan,
        L=int(samples.history_lengths.max()),
        users=len(users),
        items=items,
        items_per_s=items / seconds,
        latency_per_user_s=seconds / len(users),
        prompt_rows=batch.num_rows,
        rows_per_history_item=rows_per_item,
        max_items_in_budget=max_items_in_budget(
            plan, budget["budget_rows"], title_tokens, budget["prompt_fixed_rows"]
        ),
        **budget,
        text_items=TEXT_ITEMS if plan == "pft-i" else GROUP_SIZE if plan == "pft-s" else None,
        group_size=GROUP_SIZE if plan == "pft-s" else None,
        preset=PRESET,
        dtype=str(DTYPE).removeprefix("torch."),
        device=device_name(),
    )


@pytest.mark.parametrize("plan,length", CASES, ids=[f"{p}-{n or 'full'}" for p, n in CASES])
def test_prefill(benchmark, setup, plan, length):
    dataset, tokens, users, model, _ = setup
    samples = user_samples(dataset, users, length)
    planner = _planner(plan)
    plans = planner.plan_batch(samples.history_lengths, width=samples.max_items)
    ids = np.arange(len(samples))

    def prefill():
        batch = pack_batch(samples, ids, plans, tokens, answer=False).to(DEVICE)
        with torch.inference_mode():
            model.hidden_states(batch, validate=False)
        sync()

    benchmark.group = "inference_prefill"
    benchmark.pedantic(prefill, rounds=5 if HAS_CUDA else 3, warmup_rounds=1, iterations=1)
    batch = pack_batch(samples, ids, plans, tokens, answer=False)
    benchmark.extra_info.update(_info(setup, plan, samples, measured_seconds(benchmark), batch))


@pytest.mark.parametrize("plan,length", RANK_CASES, ids=[f"{p}-{n or 'full'}" for p, n in RANK_CASES])
def test_prefill_exact_rank(benchmark, setup, plan, length):
    evaluate = pytest.importorskip("patchrec.eval.evaluate").evaluate
    dataset, tokens, users, model, _ = setup
    samples = user_samples(dataset, users, length)
    planner = _planner(plan)
    result = {}

    def rank():
        result["r"] = evaluate(
            model, tokens, samples, planner=planner, ranking="exact", limit=len(samples), progress=False
        )
        sync()

    benchmark.group = "inference_rank"
    # ~40 s a round on CPU (the catalog term, see the module docstring): one round, no warm-up there.
    benchmark.pedantic(rank, rounds=3 if HAS_CUDA else 1, warmup_rounds=1 if HAS_CUDA else 0, iterations=1)
    plans = planner.plan_batch(samples.history_lengths, width=samples.max_items)
    batch = pack_batch(samples, np.arange(len(samples)), plans, tokens, answer=False)
    info = _info(setup, plan, samples, measured_seconds(benchmark), batch)
    info.update(ranking="exact", distinct_titles=result["r"].config.get("distinct_titles"))
    benchmark.extra_info.update(info)
