"""Exact whole-catalog ranking of one user, and where its time goes: the prompt, the catalog rows through the
decoder body, the output head on those rows; one continuation sequence per title against one row per
distinct title prefix (``patchrec.eval.exact.PrefixTree``).

Setting: ML-100K (1,658 distinct titles), the first user with more than 100 items, the latest 100 before their
last one as the prompt (vanilla plan: the plan only changes the prompt's share), tiny preset and SmolLM2-135M.
Providers: ``per-title`` (``score_titles(..., shared_prefixes=False)``) and ``prefix-tree`` (the default);
their scores are checked equal (fp32 rounding) before timing.

``extra_info``: ``split_per_round``, per timed round the seconds in ``encode_prompts`` (prompt),
``forward_continuations`` (catalog rows through the decoder body: attention to the cached prompt and within
titles, MLPs) and ``token_logprobs`` / ``pair_logprobs`` (the output head and log-softmax on the catalog
rows), measured by wrapping those functions; the rows of each part; the model; load average before and
after. ``patchrec results check`` renders the split from these rounds.

    PATCHREC_PEER_ROUNDS=5 python -m pytest benches/bench_exact_split.py -p no:cacheprovider \
        --benchmark-json=benches/results/exact-split-cpu.json
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from machine import measured_seconds, sync
from peers import MODELS, available, load, long_users, machine_info, pack, user_samples

if available():
    pytest.skip(available(), allow_module_level=True)

import patchrec.eval.exact as exact  # noqa: E402

ROUNDS = int(os.environ.get("PATCHREC_PEER_ROUNDS", 5))
DATA, LENGTH = "ml-100k", 100
PARTS = {"encode_prompts": "prompt", "forward_continuations": "catalog_body",
         "token_logprobs": "catalog_head", "pair_logprobs": "catalog_head"}  # fmt: skip
LAYOUTS = {"per-title": False, "prefix-tree": True}


class Timed:
    """Seconds spent in the wrapped functions of ``patchrec.eval.exact`` while it is installed."""

    def __init__(self, monkeypatch):
        self.seconds = dict.fromkeys(PARTS.values(), 0.0)
        for name, part in PARTS.items():
            monkeypatch.setattr(exact, name, self._wrap(getattr(exact, name), part))

    def _wrap(self, fn, part):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[part] += time.perf_counter() - start
            return out

        return timed


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_exact_split(benchmark, model, layout, monkeypatch):
    before = machine_info()
    setup = load(model, DATA)
    samples = user_samples(setup.dataset, long_users(setup.dataset, 1, LENGTH), LENGTH)
    batch = pack(setup, samples, np.arange(1), "vanilla", LENGTH, answer=False)
    catalog = exact.CatalogTitles.from_table(setup.tokens.titles)
    tree = catalog.prefix_tree(setup.tokens.prompt.eot)
    shared = LAYOUTS[layout]
    eot = setup.tokens.prompt.eot
    model_ = setup.model.eval()

    def score(shared_prefixes):
        with torch.inference_mode():
            out = exact.score_titles(model_, batch, catalog, eot, max_rows=8192,
                                     shared_prefixes=shared_prefixes)  # fmt: skip
        sync()
        return out

    if LAYOUTS[layout]:  # the same scores as one sequence per title, checked before timing
        torch.testing.assert_close(score(True), score(False), rtol=1e-5, atol=1e-4)
    else:
        score(False)  # warm-up
    timed = Timed(monkeypatch)
    split: list[dict[str, float]] = []  # per round: seconds in each part (the raw data of the split)

    def one_round():
        start = dict(timed.seconds)
        out = score(shared)
        split.append({part: timed.seconds[part] - start[part] for part in timed.seconds})
        return out

    benchmark.group = f"exact_split-{model}"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    catalog_rows = len(tree) if LAYOUTS[layout] else int(catalog.lengths.sum())
    benchmark.extra_info.update(
        provider=layout, plan="vanilla", L=LENGTH, data=DATA, users=1, distinct_titles=len(catalog),
        prompt_rows=batch.num_rows, catalog_rows=catalog_rows, head_rows=catalog_rows,
        median_s=measured_seconds(benchmark), min_s=measured_seconds(benchmark, "min"),
        split_per_round=split, **setup.info(),
        load_average_before=before["load_average_1min"],
        load_average_after=machine_info()["load_average_1min"], cores=before["cores"],
        threads=before["threads"],
    )  # fmt: skip
