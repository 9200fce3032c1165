"""The PerSRec result tables, computed from raw files only: per-sample ranks of every run (the ID-model
table, the staleness study) and per-sample values (the horizon study). The bench scripts that produce the
results write their summaries with these functions, and ``patchrec results check`` recomputes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from patchrec.eval.metrics import ranking_metrics
from patchrec.eval.paired import paired_difference, per_sample, seed_mean

METRICS = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")
# (a, b) rows of the ID-model table compared sample by sample
PAIRS = [("window", "full"), ("rolling", "full"), ("recent", "full"), ("window", "recent"),
         ("rolling", "recent"), ("rolling", "window")]  # fmt: skip


def checked_metrics(result: dict, where: str, ks=(10, 20)) -> dict[str, float]:
    """The metrics of a result (its ``ranks`` and stored ``metrics``: a results.json, or one row of a table)
    recomputed from its ranks at ``ks``; ValueError naming ``where`` when a stored one differs or there are
    no ranks."""
    if "ranks" not in result:
        raise ValueError(f"{where}: no per-sample ranks")
    metrics = ranking_metrics(np.asarray(result["ranks"]), ks)
    for name, value in metrics.items():
        if abs(value - result["metrics"][name]) > 1e-12:
            raise ValueError(f"{where}: {name} {result['metrics'][name]} != {value} from its ranks")
    return metrics


def persrec_id_summary(runs: Path, models, variants, seeds) -> dict:
    """Rows (mean and seed spread per model and variant) and paired differences of the runs in ``runs``
    (``<model>-<variant>-seed<s>/results.json``)."""
    rows, pairs = [], []
    for model in models:
        ranks = {}
        for variant in variants:
            names = [f"{model}-{variant}-seed{s}" for s in seeds]
            results = [json.loads((runs / n / "results.json").read_text()) for n in names]
            checked = [checked_metrics(r, n) for r, n in zip(results, names, strict=True)]
            values = {m: [c[m] for c in checked] for m in METRICS}
            ranks[variant] = [r["ranks"] for r in results]
            rows.append({
                "model": model, "variant": variant, "history_items": results[0]["config"]["max_items"],
                "seeds": list(seeds), "num_samples": results[0]["num_samples"],
                **{m: float(np.mean(v)) for m, v in values.items()},
                **{f"{m}_sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
                "best_epochs": [r["training"]["best_epoch"] for r in results],
                "epochs": [r["training"]["epochs_run"] for r in results],
                "train_s_mean": float(np.mean([r["training"]["seconds"] for r in results])),
            })  # fmt: skip
        for a, b in PAIRS:
            if a in ranks and b in ranks:
                for metric in ("HR@20", "NDCG@10"):
                    diff = paired_difference(seed_mean(ranks[a], metric), seed_mean(ranks[b], metric))
                    pairs.append({"model": model, "a": a, "b": b, "metric": metric, **diff})
    return {"rows": rows, "pairs": pairs}


def persrec_id_table(summary: dict) -> str:
    last = " | best epoch / epochs per seed |"
    lines = ["| model | variant | history items | " + " | ".join(METRICS) + last,
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]  # fmt: skip
    for r in summary["rows"]:
        # the ± is the spread over seeds; with one seed there is none to show
        spread = len(r["seeds"]) > 1
        cells = " | ".join(f"{r[m]:.4f}" + (f" ± {r[m + '_sd']:.4f}" if spread else "") for m in METRICS)
        best = ", ".join(f"{b}/{e}" for b, e in zip(r["best_epochs"], r["epochs"], strict=True))
        lines.append(f"| {r['model']} | {r['variant']} | {r['history_items']} | {cells} | {best} |")
    return "\n".join(lines) + "\n"


def persrec_id_pairs(summary: dict) -> str:
    lines = ["| model | a - b | metric | a | b | diff | paired s.e. | 95% bootstrap interval |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in summary["pairs"]:
        lines.append(f"| {p['model']} | {p['a']} - {p['b']} | {p['metric']} | {p['a_mean']:.4f} "
                     f"| {p['b_mean']:.4f} | {p['diff']:+.4f} | {p['se']:.4f} "
                     f"| [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] |")  # fmt: skip
    return "\n".join(lines) + "\n"


def staleness_rows(ranks: dict[int, np.ndarray], lags) -> list[dict]:
    """Per lag m: HR@20 and NDCG@10 of the stale state (a) against the refolded one (b, m = 0), paired."""
    rows = []
    for lag in lags:
        row = {"m": int(lag)}
        for metric in ("HR@20", "NDCG@10"):
            row[metric] = paired_difference(per_sample(ranks[lag], metric), per_sample(ranks[0], metric))
        rows.append(row)
    return rows


def staleness_table(results: list[dict]) -> str:
    lines = ["| run | m | HR@20 refolded | HR@20 stale | diff (s.e.) [95% CI] | NDCG@10 refolded "
             "| NDCG@10 stale | diff (s.e.) [95% CI] |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        for row in res["rows"]:
            cells = []
            for metric in ("HR@20", "NDCG@10"):
                d = row[metric]
                cells.append(f"{d['b_mean']:.4f} | {d['a_mean']:.4f} | {d['diff']:+.4f} ({d['se']:.4f}) "
                             f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")  # fmt: skip
            lines.append(f"| {res['run']} | {row['m']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def horizon_table(results: list[dict]) -> str:
    lines = ["| run | j (segments back) | top-20 overlap | relative score change | abs. target-rank change |",
             "|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        for back, values in res["per_j"].items():
            (o, os_), (r, rs), (k, ks) = (
                mean_se(values[key]) for key in ("top20_overlap", "relative_change", "rank_change")
            )
            text = f"{o:.4f} ± {os_:.4f} | {r:.2e} ± {rs:.1e} | {k:.2f} ± {ks:.2f}"
            lines.append(f"| {res['run']} (n={len(res['samples'])}) | {back} | {text} |")
    return "\n".join(lines) + "\n"
