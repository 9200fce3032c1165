"""PerSRec on the ID models with long histories: SASRec and HSTU on ML-1M, each in four variants, several
seeds, the same training budget in epochs for every run.

- ``full``: the latest L = 400 items (plain causal attention);
- ``window``: the PerSRec paper's layout, the newest R = 50 items plus one old window of P = 350 items
  compressed into k = 4 tokens (the same 400 items of history);
- ``rolling``: the bounded layout, the user's whole timeline in segments of N = 50 items carried by a k = 4
  vector memory (every item of the history, however long);
- ``recent``: the latest 50 items only.

Every run is ``patchrec baseline ...`` in ``runs/<model>-<variant>-seed<s>/`` (results.json with per-sample
ranks, config.json, model.safetensors, and its log beside it); a finished run is skipped, so re-running the
same command resumes. ``summary.json`` / ``summary.md`` hold per-variant means and seed spreads, and paired
differences between variants (per-sample metrics averaged over seeds, bootstrap over test samples).

    python benches/persrec_id_table.py --data ../shared/data/patchrec/ml-1m \\
        --out benches/results/persrec-id-ml1m --epochs 8 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from patchrec.eval.paired import paired_difference, seed_mean

VARIANTS = {
    "full": ["--max-items", "{history}"],
    "window": ["--persrec-tokens", "{k}", "--persrec-layout", "window", "--persrec-window", "{window}",
               "--persrec-recent", "{recent}"],
    "rolling": ["--persrec-tokens", "{k}", "--persrec-layout", "rolling", "--persrec-segment", "{segment}"],
    "recent": ["--max-items", "{recent}"],
}  # fmt: skip
METRICS = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")
# (a, b) rows compared sample by sample
PAIRS = [("window", "full"), ("rolling", "full"), ("recent", "full"), ("window", "recent"),
         ("rolling", "recent"), ("rolling", "window")]  # fmt: skip


def command(args, model: str, variant: str, seed: int, out: Path) -> list[str]:
    fill = dict(history=args.window + args.recent, k=args.tokens, window=args.window, recent=args.recent,
                segment=args.segment)  # fmt: skip
    flags = [f.format(**fill) for f in VARIANTS[variant]]
    return [
        sys.executable, "-m", "patchrec", "baseline", model, "--data", args.data,
        "--epochs", str(args.epochs), "--patience", str(args.epochs), "--eval-every", str(args.eval_every),
        "--batch-size", str(args.batch_size), "--threads", "1", "--seed", str(seed), "--no-progress",
        "--out", str(out), *flags,
    ]  # fmt: skip


def run_one(args, model: str, variant: str, seed: int) -> Path:
    out = Path(args.out) / "runs" / f"{model}-{variant}-seed{seed}"
    if not (out / "results.json").exists():
        cmd = command(args, model, variant, seed, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(" ".join(cmd), flush=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out


def summarize(args, runs: dict[tuple[str, str, int], Path]) -> dict:
    results = {key: json.loads((path / "results.json").read_text()) for key, path in runs.items()}
    rows, pairs = [], []
    for model in args.models:
        ranks = {}
        for variant in args.variants:
            per_seed = [results[(model, variant, s)] for s in args.seeds]
            ranks[variant] = [r["ranks"] for r in per_seed]
            values = {m: [r["metrics"][m] for r in per_seed] for m in METRICS}
            training = [r["training"] for r in per_seed]
            rows.append({
                "model": model, "variant": variant, "history_items": per_seed[0]["config"]["max_items"],
                "seeds": list(args.seeds), "num_samples": per_seed[0]["num_samples"],
                **{m: float(np.mean(v)) for m, v in values.items()},
                **{f"{m}_sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
                "best_epochs": [t["best_epoch"] for t in training],
                "train_s_mean": float(np.mean([t["seconds"] for t in training])),
            })  # fmt: skip
        for a, b in PAIRS:
            if a in ranks and b in ranks:
                for metric in ("HR@20", "NDCG@10"):
                    diff = paired_difference(seed_mean(ranks[a], metric), seed_mean(ranks[b], metric))
                    pairs.append({"model": model, "a": a, "b": b, "metric": metric, **diff})
    return {"command": " ".join(sys.argv), "args": vars(args), "rows": rows, "pairs": pairs}


def table(summary: dict) -> str:
    lines = ["| model | variant | history items | " + " | ".join(METRICS) + " | best epochs | train s |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|---|"]  # fmt: skip
    for r in summary["rows"]:
        cells = " | ".join(f"{r[m]:.4f} ± {r[m + '_sd']:.4f}" for m in METRICS)
        epochs = ",".join(str(e) for e in r["best_epochs"])
        lines.append(f"| {r['model']} | {r['variant']} | {r['history_items']} | {cells} | {epochs} "
                     f"| {r['train_s_mean']:.0f} |")  # fmt: skip
    lines += ["", "Paired differences (a - b; per-sample metric averaged over seeds; s.e. and 95% bootstrap "
              "interval over test samples):", "", "| model | a - b | metric | a | b | diff | s.e. | 95% CI |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in summary["pairs"]:
        lines.append(f"| {p['model']} | {p['a']} - {p['b']} | {p['metric']} | {p['a']:.4f} | {p['b']:.4f} "
                     f"| {p['diff']:+.4f} | {p['se']:.4f} | [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="release directory (ML-1M)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=["sasrec", "hstu"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of every run (best on val)")
    parser.add_argument("--eval-every", type=int, default=2, help="epochs between validations (2)")
    parser.add_argument("--batch-size", type=int, default=32, help="training sequences per step (32)")
    parser.add_argument("--window", type=int, default=350, help="P, the old window (350)")
    parser.add_argument("--recent", type=int, default=50, help="R, the recent items (50)")
    parser.add_argument("--segment", type=int, default=50, help="N, the rolling segment (50)")
    parser.add_argument("--tokens", type=int, default=4, help="k, PerSRec tokens (4)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (2)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [(m, v, s) for s in args.seeds for m in args.models for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        paths = list(pool.map(lambda key: run_one(args, *key), keys))
    summary = summarize(args, dict(zip(keys, paths, strict=True)))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(table(summary))
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
