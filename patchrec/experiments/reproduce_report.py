"""The table and figure of a ``patchrec reproduce`` summary (``summary.json`` -> Markdown, PNG), and the table
of its dry run (``dry_run.json`` -> Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row_line(r: dict[str, Any]) -> str:
    m = r["metrics"]
    return (
        f"| {r.get('label') or r['name']} | {r.get('experiment', 'table2')} | {r['ranking']} | "
        + " | ".join(f"{m[c]:.4f}" for c in COLUMNS)
        + f" | {r.get('length') or '-'} | {_fmt(r['cr_measured'], '.2f')} | {_fmt(r['cr_nominal'], '.2f')}"
        f" | {_fmt(r.get('history_tokens'), ',.1f')} | {_fmt(r['steps'], 'd')}"
        f" | {_fmt(r['samples_trained'], ',d')} | {_fmt(r['train_rows_per_s'], ',.0f')}"
        f" | {_fmt(r['train_seconds'], ',.0f')} | {_fmt(r.get('last_stage_seconds'), ',.0f')}"
        f" | {_fmt(r['eval_s_per_sample'], '.2f')} | {r.get('eval_dtype') or '-'} |"
    )  # fmt: skip


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: one line per row (metrics, L, CR, training and evaluation cost), the exact ranking when
    there is one, the cost curve of experiment long, then how it was measured."""
    s = summary["settings"]
    head = ("| model | experiment | ranking | HR@10 | HR@20 | NDCG@10 | NDCG@20 | L | CR measured "
            "| CR nominal | history tokens | steps / stage | samples / stage | train rows/s | train s "
            "| last stage s | eval s/sample | eval dtype |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines += [_row_line(r) for r in summary["rows"]]
    exact = [r for r in summary["rows"] if r.get("exact_metrics")]
    if exact:
        lines += ["", "Exact whole-catalog ranking of the same samples:", "",
                  "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        lines += [f"| {r.get('label') or r['name']} | "
                  + " | ".join(f"{r['exact_metrics'][c]:.4f}" for c in COLUMNS) + " |" for r in exact]
    if summary.get("cost_curve"):
        lines += ["", "Cost curve (experiment long; per test sample, computed from the data):", "",
                  "| L | plan | history tokens | prompt positions |", "|---|---|---|---|"]
        lines += [f"| {c['length']} ({c['max_items']}) | {c['plan']}"
                  f"{'' if c['plan'] == 'vanilla' else ' (K=G=' + str(c['k']) + ')'} | "
                  f"{c['history_tokens']:,.1f} | {c['prompt_rows']:,.1f} |" for c in summary["cost_curve"]]
    preset = f"preset `{s.get('preset', '-')}` ({s.get('preset_source', '-')})"
    lines += [
        "",
        f"{summary['test_samples']} test samples of {Path(s['data']).name} (seeded subset; unmasked), "
        f"L = {s['max_items']}, backbone `{Path(s['backbone']).name}`, scale `{s['scale']}`, {preset}"
        f"{', --authors-code (pre-training never compresses)' if s.get('authors_code') else ''}. LLM rows: "
        f"{summary['llm_ranking']} (a miss counts as rank >= 20), evaluated in "
        f"{summary.get('eval_dtype', 'float32')}; ID baselines: {summary['baseline_ranking']}. "
        "Every LLM stage: the same training samples, the same samples per step and the same number of steps; "
        "rows after patch pre-training share that one stage (train rows/s and train s cover every stage of "
        "the row; last stage s is its own last stage). CR: history title tokens before / after compression; "
        "history tokens: after.",
    ]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: str | Path) -> Path | None:
    """HR@20 against CR, training / evaluation cost against CR, and (experiment long) the cost curve of
    history tokens against L (None without matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in summary["rows"] if r["cr_measured"] is not None]
    curve = summary.get("cost_curve") or []
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(15 if curve else 10, 4.5))
    left, right = axes[0], axes[1]
    experiments = list(dict.fromkeys(r.get("experiment", "table2") for r in rows))
    colors = {e: f"C{i}" for i, e in enumerate(experiments)}
    for r in rows:
        color = colors[r.get("experiment", "table2")]
        left.scatter(r["cr_measured"], r["metrics"]["HR@20"], color=color)
        left.annotate(r["name"], (r["cr_measured"], r["metrics"]["HR@20"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7)  # fmt: skip
    for e in experiments:
        left.scatter([], [], color=colors[e], label=e)
    for r in summary["rows"]:
        if r["cr_measured"] is None:
            left.axhline(r["metrics"]["HR@20"], ls=":", lw=1, color="grey")
            left.annotate(r["name"], (left.get_xlim()[0], r["metrics"]["HR@20"]), fontsize=7, color="grey")
    left.set(xlabel="compression ratio (measured)", ylabel="HR@20", title="quality vs compression")
    left.legend(fontsize=7)
    trained = [r for r in rows if r["train_rows_per_s"]]
    right.scatter([r["cr_measured"] for r in trained],
                  [r["last_stage_seconds"] / r["samples_trained"] for r in trained], marker="^",
                  label="train s / sample (own last stage)")  # fmt: skip
    right.scatter([r["cr_measured"] for r in rows], [r["eval_s_per_sample"] for r in rows], marker="s",
                  label="beam eval s / sample")  # fmt: skip
    right.set(xlabel="compression ratio (measured)", ylabel="seconds", title="cost vs compression")
    right.legend(fontsize=7)
    if curve:
        ax = axes[2]
        for plan in dict.fromkeys(c["plan"] for c in curve):
            points = sorted((c["max_items"], c["history_tokens"]) for c in curve if c["plan"] == plan)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=plan)
        ax.set(xlabel="history length L (items; the last point: all)", ylabel="history tokens per sample",
               title=f"cost vs history length (K = G = {curve[0]['k']})", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def dry_run_table(dry: dict[str, Any]) -> str:
    """Markdown of a dry run: stages (samples, steps, estimated positions and FLOPs, checkpoints), rows
    (evaluation positions and FLOPs) and the GPU hours under the assumed throughput."""
    s, m, t = dry["settings"], dry["model"], dry["throughput_assumed"]
    lines = [
        f"Dry run of `patchrec reproduce` on {dry['dataset']}: scale `{s['scale']}`, preset `{s['preset']}` "
        f"({s['preset_source']}), experiments {', '.join(dry['experiments'])}, backbone "
        f"`{Path(s['backbone']).name}` ({m['params'] / 1e9:.3g}B parameters, {m['body_params'] / 1e9:.3g}B "
        f"in the decoder body){', --authors-code' if s.get('authors_code') else ''}. Estimates, not "
        "measurements.",
        "",
        "| stage | experiment | plan | from | L | K | G | p | lr | batch | samples | steps | views "
        "| positions / sample | positions | TFLOP | save every | checkpoints |",
        "|" + "---|" * 18,
    ]
    for x in dry["stages"]:
        lines.append(
            f"| {x['stage']} | {x['experiment']} | {x['plan']} | {x['init']} | {x['length']} "
            f"| {_fmt(x['k'], 'd')} | {_fmt(x['g'], 'd')} | {x['p'] or '-'} | "
            f"{x['lr']:g} | {x['batch_size']} | {x['samples']:,} | {x['steps']:,} | {x['views']} | "
            f"{x['rows_per_sample']:,.1f} | {x['rows']:,.3g} | {x['tflop']:,.4g} | {x['save_every'] or '-'} "
            f"| {x['checkpoints']} x {x['checkpoint_gb']:.3g} GB |"
        )  # fmt: skip
    lines += ["", "| row | experiment | model | plan | L | test samples | prompt positions / sample "
                  "| beam positions (upper bound) | beam TFLOP | exact positions | exact TFLOP |",
              "|" + "---|" * 11]  # fmt: skip
    for r in dry["rows"]:
        lines.append(
            f"| {r['label']} | {r['experiment']} | {r['model']} | {r['plan']} | {r['length']} "
            f"| {r['samples']:,} | {r['prompt_rows_per_sample']:,.1f} | {r['beam_rows']:,.3g} "
            f"| {r['beam_tflop']:,.4g} "
            f"| {_fmt(r.get('exact_rows'), ',.3g')} | {_fmt(r.get('exact_tflop'), ',.4g')} |"
        )  # fmt: skip
    tot = dry["totals"]
    lines += ["", "Estimated GPU hours (a stage shared by several experiments counts in the first):", "",
              "| experiment | training | beam ranking (upper bound) | exact ranking |", "|---|---|---|---|"]
    for name, part in [*tot["by_experiment"].items(), ("total", tot)]:
        lines.append(f"| {name} | {part['train_gpu_hours']:,.2f} | {part['beam_gpu_hours']:,.2f} "
                     f"| {part['exact_gpu_hours']:,.2f} |")  # fmt: skip
    lines += [
        "",
        f"Assumed sustained throughput per GPU: {t['train_tflops']:g} TFLOP/s training, {t['eval_tflops']:g} "
        "TFLOP/s ranking (assumptions, not measurements). FLOPs: 6 x decoder-body parameters per packed "
        "position + 6 x vocab x hidden per answer token (training), 2 x body per prompt position + 2 x (body "
        "+ vocab x hidden) per scored position (ranking); attention FLOPs left out. Positions per training "
        "sample are planned on a seeded subset of up to 20,000 samples per stage; beam positions assume "
        "every beam runs for the longest title's tokens.",
    ]
    return "\n".join(lines)
