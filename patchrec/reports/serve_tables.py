"""The tables of the ``patchrec serve`` load benchmark (``benches/bench_serve.py``), computed from its raw
points alone: per (model, batching, clients) the median over rounds (and min / max of requests/s), and the
batching on / off ratio of requests/s measured in the same round."""

from __future__ import annotations

import numpy as np

STATS = {
    "requests_per_s": lambda p: p["requests_per_s"],
    "p50_ms": lambda p: p["p50_ms"],
    "p99_ms": lambda p: p["p99_ms"],
    "recommend_p50_ms": lambda p: p["recommend"]["p50_ms"],
    "recommend_p99_ms": lambda p: p["recommend"]["p99_ms"],
    "mean_batch_requests": lambda p: p["mean_batch_requests"],
}


def serve_summary(points: list[dict]) -> list[dict]:
    """One row per (model, batching, clients): rounds, errors, exactly-once, and median / min / max of each
    statistic over the rounds."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["model"], p["batching"], p["clients"]), []).append(p)
    out = []
    for (model, batching, clients), ps in sorted(groups.items()):
        row = {"model": model, "batching": batching, "clients": clients, "rounds": len(ps),
               "errors": sum(sum(p["errors"].values()) for p in ps),
               "exactly_once": all(p["exactly_once"] for p in ps)}  # fmt: skip
        for key, get in STATS.items():
            values = [get(p) for p in ps]
            row[key] = {"median": float(np.median(values)), "min": float(min(values)),
                        "max": float(max(values))}  # fmt: skip
        out.append(row)
    return out


def serve_table(summary: list[dict]) -> str:
    lines = ["| model | clients | batching | req/s (min-max) | p50 ms | p99 ms | recommend p50 / p99 ms | "
             "requests per batch | errors |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(summary, key=lambda r: (r["model"], r["clients"], r["batching"])):
        m = {k: r[k]["median"] for k in STATS}
        rps = r["requests_per_s"]
        lines.append(f"| {r['model']} | {r['clients']} | {r['batching']} | {m['requests_per_s']:.1f} "
                     f"({rps['min']:.1f}-{rps['max']:.1f}) | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                     f"{m['recommend_p50_ms']:.1f} / {m['recommend_p99_ms']:.1f} | "
                     f"{m['mean_batch_requests']:.2f} | {r['errors']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def serve_ratios(points: list[dict]) -> str:
    """Batching on / off requests/s per model and client count: the median of the per-round ratios (each
    round's ratio in brackets)."""
    rps = {(p["model"], p["batching"], p["clients"], p["round"]): p["requests_per_s"] for p in points}
    models = sorted({p["model"] for p in points})
    clients = sorted({p["clients"] for p in points})
    rounds = sorted({p["round"] for p in points})
    head = " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in clients)
    lines = [f"| model | {head} |", "|---|" + "---|" * len(clients)]
    for model in models:
        cells = []
        for c in clients:
            ratios = [rps[(model, "on", c, k)] / rps[(model, "off", c, k)] for k in rounds
                      if (model, "on", c, k) in rps and (model, "off", c, k) in rps]  # fmt: skip
            each = ", ".join(f"{x:.2f}" for x in ratios)
            cells.append(f"{float(np.median(ratios)):.2f} ({each})" if ratios else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["serve_ratios", "serve_summary", "serve_table"]
