"""The horizon of PerSRec's rolling memory: how much does the recommendation change when the items of one
old segment, j segments before the open one, are replaced by random items (j = 1..8)?

For test samples whose history holds at least 8 folded segments, the items of segment (S - j) are redrawn
uniformly from the catalog (seeded) and the whole timeline is scored again. Per j: the mean overlap of the
top-20 lists (1 = unchanged), the mean relative change of the score vector (||s_j - s|| / ||s - mean(s)||),
and the mean absolute change of the target's rank, each with its standard error over samples. A model whose
state reached back only ``layers`` segments would show exactly zero change beyond that. Raw per-sample values
are saved.

    python benches/persrec_horizon.py --runs benches/results/persrec-id-ml1m/runs \\
        --data ../shared/data/patchrec/ml-1m --out benches/results/persrec-horizon-ml1m
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from patchrec.baselines.checkpoint import load_baseline
from patchrec.baselines.train import cu_seqlens_of, score_last
from patchrec.data.dataset import gather_ragged, make_samples
from patchrec.data.source import load_data
from patchrec.reports.persrec_tables import horizon_table

TOP = 20


def scores_of(model, histories: list[np.ndarray]) -> torch.Tensor:
    lengths = np.array([len(h) for h in histories])
    with torch.no_grad():
        return score_last(model, torch.from_numpy(np.concatenate(histories)), cu_seqlens_of(lengths))


def study(run: Path, dataset, max_back: int, limit: int, seed: int) -> dict:
    model, config = load_baseline(run)
    segment = config["model_config"]["persrec_segment"]
    samples = make_samples(dataset, "test", config["max_items"])
    folded = (samples.history_lengths - 1) // segment
    eligible = np.flatnonzero(folded >= max_back)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=min(limit, len(eligible)), replace=False))
    flat = dataset.items.astype(np.int64)
    histories = [gather_ragged(flat, samples.hist_start[[i]], samples.history_lengths[[i]]) for i in chosen]
    targets = torch.from_numpy(flat[samples.target_index[chosen]])
    base = scores_of(model, histories)
    base_top = base.topk(TOP).indices
    base_rank = (base > base.gather(1, targets[:, None])).sum(1)
    spread = (base - base.mean(1, keepdim=True)).norm(dim=1)
    per_j = {}
    for back in range(1, max_back + 1):
        changed = []
        for h, s in zip(histories, folded[chosen], strict=True):
            h = h.copy()
            start = (int(s) - back) * segment
            h[start : start + segment] = rng.integers(0, dataset.num_items, size=segment)
            changed.append(h)
        other = scores_of(model, changed)
        overlap = [len(set(a.tolist()) & set(b.tolist())) / TOP
                   for a, b in zip(base_top, other.topk(TOP).indices, strict=True)]  # fmt: skip
        relative = ((other - base).norm(dim=1) / spread).numpy()
        rank = (other > other.gather(1, targets[:, None])).sum(1)
        per_j[back] = {"top20_overlap": overlap, "relative_change": relative.tolist(),
                       "rank_change": (rank - base_rank).abs().tolist()}  # fmt: skip
    return {"run": run.name, "segment": segment, "samples": chosen.tolist(), "per_j": per_j}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", required=True, help="runs/ directory of persrec_id_table.py")
    parser.add_argument("--data", required=True, help="the release the runs were trained on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--names", nargs="+", default=["sasrec-rolling-seed0", "hstu-rolling-seed0"])
    parser.add_argument("--max-back", type=int, default=8, help="j = 1 .. this (8)")
    parser.add_argument("--limit", type=int, default=300, help="seeded test samples at most (300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = load_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [study(Path(args.runs) / n, dataset, args.max_back, args.limit, args.seed) for n in args.names]
    record = {"command": " ".join(["python", *sys.argv]), "args": vars(args), "results": results}
    (out / "horizon.json").write_text(json.dumps(record) + "\n")
    (out / "summary.md").write_text(horizon_table(results))
    print(horizon_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
