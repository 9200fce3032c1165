"""The PerSRec table of issue 11 on the ID models: SASRec and HSTU on ML-100K / ML-1M with the full history
(latest L items), with PerSRec (old segments of S items -> K tokens each, cached state) and truncated to the
recent S items; HR/NDCG@10/20, train time, per-user inference latency (batch 1) and state size.

Every run is ``patchrec baseline ...`` in its own directory; a finished run (results.json present) is
skipped, so re-running the same command resumes. Then ``summary.json`` / ``summary.md`` are written.

    python benches/persrec_id_table.py --data-root ../shared/data/patchrec --out benches/results/persrec-id
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    # name: (history items read, PerSRec flags)
    "full": ("L", []),
    "persrec": ("L", ["--persrec-tokens", "{k}", "--persrec-segment", "{s}", "--persrec-cache", "on"]),
    "recent only": ("S", []),
}


def run_one(args, dataset: str, model: str, variant: str, out: Path) -> dict:
    items, flags = VARIANTS[variant]
    max_items = args.max_items if items == "L" else args.segment
    flags = [f.format(k=args.tokens, s=args.segment) for f in flags]
    if not (out / "results.json").exists():
        cmd = [
            sys.executable, "-m", "patchrec", "baseline", model,
            "--data", str(Path(args.data_root) / dataset),
            "--max-items", str(max_items), "--max-minutes", str(args.minutes[dataset]), "--patience",
            str(args.patience), "--latency-samples", str(args.latency_samples), "--no-progress",
            "--batch-size", str(args.batch_size[dataset]), "--threads", str(args.threads),
            "--out", str(out), *flags,
        ]  # fmt: skip
        print(" ".join(cmd), flush=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    result = json.loads((out / "results.json").read_text())
    lat = result["latency"]
    return {
        "dataset": dataset,
        "model": model,
        "variant": variant,
        "max_items": max_items,
        **{k: result["metrics"][k] for k in ("HR@10", "HR@20", "NDCG@10", "NDCG@20")},
        "train_s": result["training"]["seconds"],
        "epochs": result["training"]["epochs_run"],
        "best_epoch": result["training"]["best_epoch"],
        "ms_per_user_median": lat["ms_per_user_median"],
        "ms_per_user_min": lat["ms_per_user_min"],
        "history_items_mean": lat["history_items_mean"],
        "state_bytes_mean": lat.get("state_bytes_mean"),
        "num_samples": result["num_samples"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | model | variant | L | HR@10 | HR@20 | NDCG@10 | NDCG@20 | train s (epochs) "
        "| ms/user median (min) | state KiB/user |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        state = "-" if r["state_bytes_mean"] is None else f"{r['state_bytes_mean'] / 1024:.1f}"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['variant']} | {r['max_items']} | {r['HR@10']:.4f} "
            f"| {r['HR@20']:.4f} | {r['NDCG@10']:.4f} | {r['NDCG@20']:.4f} | {r['train_s']:.0f} "
            f"({r['epochs']}) | {r['ms_per_user_median']:.2f} ({r['ms_per_user_min']:.2f}) | {state} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", required=True, help="directory holding ml-100k/ and ml-1m/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    parser.add_argument("--models", nargs="+", default=["sasrec", "hstu"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-items", type=int, default=200, help="L of the full and PerSRec rows (200)")
    parser.add_argument("--segment", type=int, default=50, help="PerSRec segment = the recent-only L (50)")
    parser.add_argument("--tokens", type=int, default=4, help="PerSRec tokens per segment (4)")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--minutes-100k", type=float, default=4.0, help="training budget per ML-100K run")
    parser.add_argument("--minutes-1m", type=float, default=8.0, help="training budget per ML-1M run")
    # At L = 200 a user is about one window: 128 windows a step would be only 8 steps an epoch on ML-100K and
    # 47 on ML-1M; with 128 an ML-1M run had reached val NDCG@10 0.024 after 4 epochs (464 s), with 32 0.046
    parser.add_argument("--batch-100k", type=int, default=32, help="windows per step on ML-100K (32)")
    parser.add_argument("--batch-1m", type=int, default=32, help="windows per step on ML-1M (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1)")
    args = parser.parse_args()
    args.minutes = {"ml-100k": args.minutes_100k, "ml-1m": args.minutes_1m}
    args.batch_size = {"ml-100k": args.batch_100k, "ml-1m": args.batch_1m}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets:
        for model in args.models:
            for variant in args.variants:
                run_dir = out / "runs" / f"{dataset}-{model}-{variant.replace(' ', '-')}"
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                rows.append(run_one(args, dataset, model, variant, run_dir))
                summary = {"command": " ".join(sys.argv), "args": vars(args), "rows": rows}
                (out / "summary.json").write_text(json.dumps(summary, indent=1))
                (out / "summary.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
