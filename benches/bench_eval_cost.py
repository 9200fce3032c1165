"""Per-user cost of the two whole-catalog rankings of ``patchrec.eval.evaluate``: exact log-likelihood of
every title vs the authors' trie-constrained diverse beam search (20 beams in 20 groups, diversity 0.8), same
model, same prompts.

Setting: ML-100K test samples of 2 distinct users (the first test sample of each of the first two users that
have one), PFT-S with G = 20 (the paper's ML-100K setting), L = 100, the Llama-3 tokenizer. CPU: the tiny
preset; CUDA: Llama-3.2-1B shapes in bf16 (random weights). The rankings' own results (rank of the target)
are not compared: with random weights both are noise; ``tests/test_evaluate.py`` checks their agreement.

Joins with the other benches through ``extra_info``: ``provider`` is the ranking ("exact" / "beam") and
``reference`` = "exact" tells ``patchrec bench report`` which one the ratios divide by.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from machine import DEVICE, DTYPE, HAS_CUDA, PRESET, SHARED, device_name, measured_seconds

DATA = SHARED / "data" / "patchrec" / "ml-100k"
TOKENIZER = SHARED / "tokenizers" / "llama3"
if not (DATA.exists() and TOKENIZER.exists()):
    pytest.skip(f"{SHARED} (ML-100K release, Llama-3 tokenizer) not available", allow_module_level=True)

from patchrec.batching.plan import make_planner  # noqa: E402
from patchrec.model.decoder import PackedLlama  # noqa: E402

USERS, LENGTH, GROUP_SIZE, BEAMS = 2, 100, 20, 20
PLAN = "pft-s"




@pytest.fixture(scope="module")
def setup():
    try:
        from patchrec.eval.evaluate import evaluate
    except ImportError as exc:
        pytest.skip(f"patchrec.eval.evaluate is not available yet ({exc})")
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.dataset import make_samples
    from patchrec.data.release import load_release

    dataset = load_release(DATA)
    tokens = tokenize_dataset(load_tokenizer(TOKENIZER), dataset)
    test = make_samples(dataset, "test", max_items=LENGTH)
    _, first = np.unique(test.user, return_index=True)
    pick = np.sort(first)[:USERS]
    samples = test.select(pick)
    model = PackedLlama.from_preset(PRESET, tokens.vocab_size, seed=0).to(DEVICE, DTYPE).eval()
    return evaluate, tokens, samples, model


@pytest.mark.parametrize("ranking", ["exact", "beam"])
def test_eval_cost(benchmark, setup, ranking):
    evaluate, tokens, samples, model = setup
    planner = make_planner(PLAN, g=GROUP_SIZE)
    result = {}

    def run():
        result["r"] = evaluate(
            model, tokens, samples, planner=planner, ranking=ranking, limit=USERS, progress=False,
            beams=BEAMS, groups=BEAMS,
        )  # fmt: skip
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.group = "eval_cost"
    benchmark.pedantic(run, rounds=3 if HAS_CUDA else 1, warmup_rounds=1 if HAS_CUDA else 0, iterations=1)
    median = measured_seconds(benchmark)
    items = int(samples.history_lengths.sum())
    benchmark.extra_info.update(
        provider=ranking,
        reference="exact",
        plan=PLAN,
        L=LENGTH,
        users=USERS,
        items=items,
        items_per_s=items / median,
        latency_per_user_s=median / USERS,
        ranking_config=result["r"].config,
        preset=PRESET,
        dtype=str(DTYPE).removeprefix("torch."),
        device=device_name(),
    )
