"""Staleness of a PerSRec state (the paper's decay study): how much do recommendations lose when the state
was built m interactions before the request and not refolded since?

For every test sample of each trained window / rolling model (``benches/persrec_id_table.py``'s runs), the
state is built from the history as it was m interactions earlier and the recent block is read as it is now
(``patchrec.persrec.staleness``); m = 0 is the exact cached path. Reported per m: HR@20 and NDCG@10 with and
without refolding and their paired difference (standard error and 95% bootstrap interval over the samples).
Per-sample ranks for every m are saved, so every number can be recomputed.

    python benches/persrec_staleness.py --runs benches/results/persrec-id-ml1m/runs \\
        --data ../shared/data/patchrec/ml-1m --out benches/results/persrec-staleness-ml1m
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from patchrec.baselines.checkpoint import load_baseline
from patchrec.data.dataset import make_samples
from patchrec.data.source import load_data
from patchrec.eval.metrics import rank_samples, ranking_metrics
from patchrec.persrec.staleness import stale_scorer
from patchrec.reports.persrec_tables import staleness_rows, staleness_table


def study(run: Path, dataset, lags: list[int]) -> dict:
    model, config = load_baseline(run)
    samples = make_samples(dataset, "test", config["max_items"])
    ranks = {}
    for lag in [0, *lags]:
        ranks[lag] = rank_samples(stale_scorer(model, samples, lag), samples, desc=f"{run.name} m={lag}")
        print(f"{run.name} m={lag}: {ranking_metrics(ranks[lag], (10, 20))}", flush=True)
    return {"run": run.name, "layout": config["model_config"]["persrec_layout"], "model": config["model"],
            "lags": list(lags), "ranks": {str(m): r.tolist() for m, r in ranks.items()}}  # fmt: skip


def with_rows(result: dict) -> dict:
    """A study's result with its paired rows, computed from the saved per-sample ranks."""
    ranks = {int(m): np.asarray(r) for m, r in result["ranks"].items()}
    return result | {"rows": staleness_rows(ranks, result["lags"])}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", required=True, help="runs/ directory of persrec_id_table.py")
    parser.add_argument("--data", required=True, help="the release the runs were trained on")
    parser.add_argument("--out", required=True)
    names = ["sasrec-window-seed0", "sasrec-rolling-seed0", "hstu-window-seed0", "hstu-rolling-seed0"]
    parser.add_argument("--names", nargs="+", default=names)
    parser.add_argument("--lags", nargs="+", type=int, default=[1, 5, 10, 25, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.names:
        target = out / f"{name}.json"
        if not target.exists():  # resumable: one file per run
            target.write_text(json.dumps(study(Path(args.runs) / name, dataset, args.lags)) + "\n")
        results.append(with_rows(json.loads(target.read_text())))
    summary = {"command": " ".join(["python", *sys.argv]), "args": vars(args),
               "results": [{k: v for k, v in r.items() if k != "ranks"} for r in results]}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(staleness_table(results))
    print(staleness_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
