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

from patchrec.reports.persrec_tables import persrec_id_pairs, persrec_id_summary, persrec_id_table

VARIANTS = {
    "full": ["--max-items", "{history}"],
    "window": ["--persrec-tokens", "{k}", "--persrec-layout", "window", "--persrec-window", "{window}",
               "--persrec-recent", "{recent}"],
    "rolling": ["--persrec-tokens", "{k}", "--persrec-layout", "rolling", "--persrec-segment", "{segment}"],
    "recent": ["--max-items", "{recent}"],
}  # fmt: skip


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


def write_summary(args, out: Path) -> str:
    """summary.json (the command, the arguments, rows and paired differences) and summary.md, computed from
    the runs' per-sample ranks (``patchrec.reports.persrec_tables``; ``patchrec results check`` reuses it)."""
    summary = persrec_id_summary(out / "runs", args.models, args.variants, args.seeds)
    summary = {"command": " ".join(["python", *sys.argv]), "args": vars(args), **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = persrec_id_table(summary) + "\n" + persrec_id_pairs(summary)
    (out / "summary.md").write_text(text)
    return text


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
    parser.add_argument("--summary-only", action="store_true", help="rewrite the summary from finished runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [(m, v, s) for s in args.seeds for m in args.models for v in args.variants]
    if args.summary_only:
        print(write_summary(args, out))
        return 0
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda key: run_one(args, *key), keys))
    print(write_summary(args, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
