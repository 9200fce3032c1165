"""Dataset statistics and compression ratios (``patchrec stats``).

Definitions (docs/method.md §3-4):

- ``users``: users in the release; ``items``: catalog size (every title, ranked at evaluation);
  ``interactions``: all user-item events; ``max_interactions`` / ``avg_interactions``: per user.
- ``avg_title_tokens``: mean over the catalog titles of their token count with the given tokenizer
  (each title tokenised on its own, no special tokens).
- ``samples``: per split, targets at positions >= 3 inside the split's range (history = latest ``max_items``).
- ``compression`` per plan (``pft-i`` with K = 5, ``pft-s`` with G = ``group_size``), counting **history title
  tokens only**: the ``<|start_seq|>``/``<|item_sep|>``/``<|end_seq|>`` markers are excluded, a text item
  counts its title tokens, an item patch or a session patch counts 1.
  - ``measured``: mean over the TEST samples of (tokens before / tokens after compression), per-sample ratio;
    ``tokens_before`` / ``tokens_after`` are the per-sample means of the two counts.
  - ``nominal``: the same ratio for one full history of ``max_items`` items whose titles all have
    ``avg_title_tokens`` tokens (the single figure usually quoted per dataset and plan).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patchrec.batching.pack import history_token_counts
from patchrec.batching.plan import TEXT, Planner, make_planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import SPLITS, Dataset, make_samples

PFT_I_K = 5  # the paper's main-table K


def nominal_ratio(planner: Planner, max_items: int, avg_title_tokens: float) -> float:
    """Title tokens before / after for a full history of equal-length titles (see the module docstring)."""
    (plan,) = planner.plan(max_items)
    text = int((plan.kinds == TEXT).sum())
    pieces = plan.num_pieces
    after = text * avg_title_tokens + (pieces - text)
    return float(max_items * avg_title_tokens / after)


def compression_stats(
    dataset: Dataset, tokens: TokenizedDataset, planner: Planner, max_items: int
) -> dict[str, Any]:
    samples = make_samples(dataset, "test", max_items=max_items)
    before, after = history_token_counts(samples, planner, tokens)
    measured = float(np.mean(before / after)) if len(samples) else None
    out: dict[str, Any] = {"plan": planner.name}
    if planner.name == "pft-i":
        out["k"] = planner.k
    if planner.name == "pft-s":
        out["g"] = planner.g
    out.update(
        measured=measured,
        tokens_before=float(before.mean()) if len(samples) else None,
        tokens_after=float(after.mean()) if len(samples) else None,
        nominal=nominal_ratio(planner, max_items, tokens.avg_title_tokens),
    )
    return out


def dataset_stats(
    dataset: Dataset, tokens: TokenizedDataset, max_items: int = 100, group_size: int = 5
) -> dict[str, Any]:
    """All the figures of ``patchrec stats`` as one JSON-able dict."""
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    per_user = np.diff(dataset.user_offsets)
    return {
        "dataset": dataset.name,
        "users": dataset.num_users,
        "items": dataset.num_items,
        "interactions": int(len(dataset.items)),
        "max_interactions": int(per_user.max(initial=0)),
        "avg_interactions": float(per_user.mean()) if len(per_user) else 0.0,
        "avg_title_tokens": tokens.avg_title_tokens,
        "max_items": max_items,
        "samples": {split: len(make_samples(dataset, split, max_items=max_items)) for split in SPLITS},
        "compression": {
            "pft-i": compression_stats(dataset, tokens, make_planner("pft-i", k=PFT_I_K), max_items),
            "pft-s": compression_stats(dataset, tokens, make_planner("pft-s", g=group_size), max_items),
        },
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable table of ``dataset_stats``."""
    lines = [
        f"dataset            {stats['dataset']}",
        f"users              {stats['users']:,}",
        f"items (catalog)    {stats['items']:,}",
        f"interactions       {stats['interactions']:,}",
        f"per user           max {stats['max_interactions']:,}, mean {stats['avg_interactions']:.2f}",
        f"title tokens       mean {stats['avg_title_tokens']:.3f}",
        "samples            " + ", ".join(f"{k} {v:,}" for k, v in stats["samples"].items()),
        f"compression (history title tokens before/after, L = {stats['max_items']}):",
        f"  {'plan':<14}{'measured':>10}{'nominal':>10}{'before':>10}{'after':>10}",
    ]
    for name, c in stats["compression"].items():
        label = f"{name} ({'K' if 'k' in c else 'G'}={c.get('k', c.get('g'))})"

        def fmt(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        lines.append(
            f"  {label:<14}{fmt(c['measured'], '10.3f')}{fmt(c['nominal'], '10.3f')}"
            f"{fmt(c['tokens_before'], '10.1f')}{fmt(c['tokens_after'], '10.1f')}"
        )
    return "\n".join(lines)
