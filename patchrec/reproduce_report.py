"""The table and figure of a ``patchrec reproduce`` summary (``summary.json`` -> Markdown, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: one line per row (metrics, CR, training and evaluation cost), then how it was measured."""
    s = summary["settings"]
    head = ("| model | ranking | HR@10 | HR@20 | NDCG@10 | NDCG@20 | CR measured | CR nominal "
            "| steps / stage | samples / stage | train rows/s | train s | last stage s | eval s/sample |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary["rows"]:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {r['ranking']} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS)
            + f" | {_fmt(r['cr_measured'], '.2f')} | {_fmt(r['cr_nominal'], '.2f')} | {_fmt(r['steps'], 'd')}"
            f" | {_fmt(r['samples_trained'], ',d')} | {_fmt(r['train_rows_per_s'], ',.0f')}"
            f" | {_fmt(r['train_seconds'], ',.0f')} | {_fmt(r.get('last_stage_seconds'), ',.0f')}"
            f" | {_fmt(r['eval_s_per_sample'], '.2f')} |"
        )  # fmt: skip
    exact = [r for r in summary["rows"] if r.get("exact_metrics")]
    if exact:
        lines += ["", "Exact whole-catalog ranking of the same samples:", "",
                  "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        lines += [f"| {r['name']} | " + " | ".join(f"{r['exact_metrics'][c]:.4f}" for c in COLUMNS) + " |"
                  for r in exact]  # fmt: skip
    lines += [
        "",
        f"{summary['test_samples']} test samples of {Path(s['data']).name} (seeded subset; unmasked), "
        f"L = {s['max_items']}, backbone `{Path(s['backbone']).name}`, scale `{s['scale']}`. LLM rows: "
        f"{summary['llm_ranking']} (a miss counts as rank >= 20); "
        f"ID baselines: {summary['baseline_ranking']}. "
        "Every LLM stage: the same training samples, the same samples per step and the same number of steps; "
        "PFT-I and PFT-S start from one shared patch pre-training stage (train rows/s and train s cover both "
        "stages; last stage s is the row's own fine-tuning stage). CR: history title tokens before / after "
        "compression.",
    ]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: str | Path) -> Path | None:
    """HR@20 against CR and training / evaluation cost against CR for the LLM rows (None without
    matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in summary["rows"] if r["cr_measured"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        left.scatter(r["cr_measured"], r["metrics"]["HR@20"])
        left.annotate(r["name"], (r["cr_measured"], r["metrics"]["HR@20"]), textcoords="offset points",
                      xytext=(4, 4))  # fmt: skip
    for r in summary["rows"]:
        if r["cr_measured"] is None:
            left.axhline(r["metrics"]["HR@20"], ls=":", lw=1, color="grey")
            left.annotate(r["name"], (left.get_xlim()[0], r["metrics"]["HR@20"]), fontsize=7, color="grey")
    left.set(xlabel="compression ratio (measured)", ylabel="HR@20", title="quality vs compression")
    trained = [r for r in rows if r["train_rows_per_s"]]
    right.plot([r["cr_measured"] for r in trained],
               [r["train_seconds"] / r["samples_trained"] for r in trained], "o-",
               label="train s / sample (all stages)")  # fmt: skip
    right.plot([r["cr_measured"] for r in trained],
               [r["last_stage_seconds"] / r["samples_trained"] for r in trained], "^-",
               label="train s / sample (own fine-tuning stage)")  # fmt: skip
    right.plot([r["cr_measured"] for r in rows], [r["eval_s_per_sample"] for r in rows], "s--",
               label="beam eval s / sample")  # fmt: skip
    right.set(xlabel="compression ratio (measured)", ylabel="seconds", title="cost vs compression")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
