"""Tables of the other committed results recomputed from their raw files: pytest-benchmark JSON (per-round
times), ``patchrec bench report`` directories, ``patchrec reproduce`` runs (per-sample ranks of every row)
and dry runs, and the LLM PerSRec demo (per-sample ranks). Each function raises ``ValueError`` naming the
file when a stored figure differs from its recomputation; ``patchrec.reports.results_check`` registers
them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from patchrec.eval.paired import paired_difference, per_sample
from patchrec.experiments.gpu_plan import projected_peak
from patchrec.experiments.gpu_plan_check import compare
from patchrec.experiments.reproduce_report import dry_run_table, summary_table
from patchrec.reports.bench_report import load_records, provider_ratios, write_report
from patchrec.reports.persrec_tables import checked_metrics


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def checked_benchmarks(path: Path) -> list[dict]:
    """The benchmarks of a pytest-benchmark JSON, each with per-round times (``stats.data``) whose count, min
    and median are the stored statistics; ValueError naming the file and benchmark otherwise."""
    benches = _json(path)["benchmarks"]
    for bench in benches:
        stats = bench["stats"]
        data = stats.get("data")
        if not data:
            raise ValueError(f"{path}: {bench['fullname']} has no per-round times (stats.data)")
        low, mid = float(np.min(data)), float(np.median(data))
        if len(data) != stats["rounds"] or not _close(low, stats["min"]) or not _close(mid, stats["median"]):
            raise ValueError(f"{path}: {bench['fullname']}: stored rounds / min / median differ from its "
                             "per-round times")  # fmt: skip
    return benches


def benchmark_table(path: Path) -> str:
    """One row per benchmark of a pytest-benchmark JSON: rounds, min and median seconds, recomputed from its
    per-round times (see ``checked_benchmarks``)."""
    lines = ["| benchmark | rounds | min (s) | median (s) |", "|---|---:|---:|---:|"]
    for bench in checked_benchmarks(path):
        data = bench["stats"]["data"]
        lines.append(f"| `{bench['name']}` | {len(data)} | {np.min(data):.4g} | {np.median(data):.4g} |")
    return "\n".join(lines) + "\n"


def benchmark_command(path: Path) -> str | None:
    """The command a pytest-benchmark JSON records (``benches/conftest.py`` writes it into machine_info)."""
    raw = _json(path)
    return raw.get("command") or raw.get("machine_info", {}).get("command")


def bench_report(path: Path, source: Path) -> str:
    """``report.md`` of ``patchrec bench report SOURCE`` regenerated (plots into a temporary directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / source.name  # the report names its source by file stem, not by directory
        copy.write_text(source.read_text())
        return write_report([copy], Path(tmp) / "report").read_text()


def reproduce_tables(path: Path) -> dict[str, str]:
    """A ``patchrec reproduce`` run: ``summary`` (its ``summary.md``, every row's metrics checked against the
    ranks in its results file: ``eval/<row>-<ranking>.json`` or ``baselines/<model>.json``) and ``pairs``
    (every compressed LLM row against vanilla SFT, per test sample: the rows rank the same seeded samples)."""
    summary = _json(path / "summary.json")
    rows = {}
    for row in summary["rows"]:
        name = row["name"]
        candidates = [path / "baselines" / f"{name}.json", path / "eval" / f"{name}-{row['ranking']}.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ValueError(f"{path}: row {name!r} has no results file with ranks ({candidates[1].name})")
        raw = _json(found[0])
        metrics = checked_metrics(raw, str(found[0]), raw["ks"])
        for metric, value in row["metrics"].items():
            if not _close(value, metrics[metric]):
                raise ValueError(f"{path}/summary.json: row {name!r} {metric} differs from {found[0].name}")
        rows[name] = {"name": name, "ranks": raw["ranks"]}
    compressed = [r for n, r in rows.items() if n.startswith(("pft-", "persrec"))]
    return {"summary": summary_table(summary) + "\n",
            "pairs": paired_rows([(r, rows["vanilla"]) for r in compressed])}  # fmt: skip


def dry_runs(path: Path) -> dict[str, str]:
    """Each dataset's ``dry_run.md`` redrawn from its ``dry_run.json``."""
    return {d.name: dry_run_table(_json(d / "dry_run.json")) + "\n"
            for d in sorted(path.iterdir()) if (d / "dry_run.json").is_file()}  # fmt: skip


def _opt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def demo_tables(path: Path) -> dict[str, str]:
    """``patchrec demo``'s table (metrics recomputed from every row's per-sample ranks) and the paired
    differences between its rows: each LLM row against the next, and the oracle's full vs short history."""
    raw = _json(path)
    rows = raw["rows"]
    lines = ["| model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | CR | history rows | train rows/s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        m = checked_metrics(row, f"{path}: row {row['name']!r}", raw["ks"])
        lines.append(f"| {row['name']} | {m['HR@10']:.4f} | {m['HR@20']:.4f} | {m['NDCG@10']:.4f} | "
                     f"{m['NDCG@20']:.4f} | {_opt(row['compression'], '.2f')} | "
                     f"{_opt(row['history_rows'], '.1f')} | {_opt(row['rows_per_s'], ',.0f')} |")  # fmt: skip
    llm = [r for r in rows if r["compression"] is not None]
    oracle = [r for r in rows if r["name"].startswith("topic oracle")]
    pairs = [(a, b) for i, a in enumerate(llm) for b in llm[i + 1 :]] + [tuple(oracle)] * (len(oracle) == 2)
    return {"table": "\n".join(lines) + "\n", "pairs": paired_rows(pairs)}


def paired_rows(pairs: list[tuple[dict, dict]]) -> str:
    """HR@20 and NDCG@10 of row a minus row b, per sample (rows with ``name`` and ``ranks`` of the same
    samples): the paired standard error and a 95% bootstrap interval."""
    out = ["| a | b | metric | a | b | a - b | paired s.e. | 95% bootstrap interval |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        for metric in ("HR@20", "NDCG@10"):
            d = paired_difference(per_sample(a["ranks"], metric), per_sample(b["ranks"], metric))
            interval = f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
            out.append(f"| {a['name']} | {b['name']} | {metric} | {d['a_mean']:.4f} | {d['b_mean']:.4f} | "
                       f"{d['diff']:+.4f} | {d['se']:.4f} | {interval} |")  # fmt: skip
    return "\n".join(out) + "\n"


def llm_persrec_tables(path: Path) -> dict[str, str]:
    """``benches/persrec_llm_demo.py``'s results: metrics recomputed from every row's ranks (PerSRec's cache
    off ranks checked equal to cache on where the run says so), history rows and state size, and the
    PerSRec row against each other row, paired."""
    raw = _json(path)
    lines = ["| model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | history rows | state KiB / sample |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in raw["rows"]:
        m = checked_metrics(row, f"{path}: row {row['name']!r}", raw["ks"])
        if row.get("ranks_identical_on_off") and row["ranks_cache_off"] != row["ranks"]:
            raise ValueError(f"{path}: row {row['name']!r}: cache on and off ranks differ")
        state = row.get("persrec_state_bytes_per_sample")
        lines.append(f"| {row['name']} | {m['HR@10']:.4f} | {m['HR@20']:.4f} | {m['NDCG@10']:.4f} | "
                     f"{m['NDCG@20']:.4f} | {row['history_rows_mean']:.1f} | "
                     f"{'-' if state is None else f'{state / 1024:.1f}'} |")  # fmt: skip
    persrec = [r for r in raw["rows"] if r["plan"]["stage"] == "persrec"]
    others = [r for r in raw["rows"] if r["plan"]["stage"] != "persrec"]
    return {"table": "\n".join(lines) + "\n", "pairs": paired_rows([(p, o) for p in persrec for o in others])}


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def persrec_latency_tables(path: Path) -> dict[str, str]:
    """``benches/bench_persrec_latency.py``'s JSON as tables: per model and op, min / median milliseconds of
    each method against history length (from the per-round times), and the state each method keeps."""
    benches = checked_benchmarks(path)
    lengths = sorted({b["extra_info"]["history_items"] for b in benches})
    head = "| model | op | method | " + " | ".join(f"n = {n:,}" for n in lengths) + " |"
    rule = "|---|---|---|" + "---:|" * len(lengths)
    times, states = [head, rule], [head.replace(" op |", ""), rule.replace("|---|---|---|", "|---|---|")]
    cells, state_cells = {}, {}
    for b in benches:
        info = b["extra_info"]
        model = "sasrec" if info.get("model") == "sasrec" else f"llm ({info.get('preset', '-')})"
        data = np.asarray(b["stats"]["data"]) * 1e3
        cells.setdefault((model, info["op"], info["method"]), {})[info["history_items"]] = (
            f"{_ms(data.min())} / {_ms(np.median(data))}")
        state_cells.setdefault((model, info["method"]), {})[info["history_items"]] = info["state_bytes"]
    for (model, op, method), row in cells.items():
        times.append(f"| {model} | {op} | {method} | " + " | ".join(row.get(n, "-") for n in lengths) + " |")
    for (model, method), row in state_cells.items():
        values = (f"{row[n] / 1024:,.1f} KiB" if n in row else "-" for n in lengths)
        states.append(f"| {model} | {method} | " + " | ".join(values) + " |")
    return {"times": "\n".join(times) + "\n", "state": "\n".join(states) + "\n"}


LORA_MODES = {"full": "full fine-tuning", "lora-r16": "LoRA r16, `--train-embeddings new`",
              "lora-r16-frozen-table": "LoRA r16, `--train-embeddings none`"}  # fmt: skip


def lora_table(path: Path) -> str:
    """``benches/bench_lora_step.py``'s JSON as the table of docs/backbones.md (times from the per-round
    data; samples/s = samples / median step; memory from the bench's separate fresh-process measurement)."""
    lines = ["| plan (packed rows) | mode | trainable params | step min / median (s) | samples/s "
             "| training memory |", "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for b in checked_benchmarks(path):
        info, data = b["extra_info"], np.asarray(b["stats"]["data"])
        plan = {"vanilla": "vanilla", "pft-i": "PFT-I", "pft-s": "PFT-S"}[info["plan"]]
        low, mid = data.min(), np.median(data)
        lines.append(f"| {plan} ({info['packed_rows']}) | {LORA_MODES[info['mode']]} | "
                     f"{info['trainable_params'] / 1e6:.1f} M | {low:.1f} / {mid:.1f} | "
                     f"{info['samples'] / mid:.3f} | {info['train_mem_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def peers_table(path: Path) -> str:
    """A peer bench's JSON (``benches/bench_peers_*.py``) as one table per group (operation and model): per
    plan and history length, each provider's min / median seconds per round (from the per-round times) and
    its median over patchrec's in the same run (x > 1: slower than patchrec)."""
    benches = checked_benchmarks(path)
    providers = list(dict.fromkeys(b["extra_info"]["provider"] for b in benches))
    medians: dict[tuple, dict[str, tuple[float, float]]] = {}
    for b in benches:
        info, data = b["extra_info"], np.asarray(b["stats"]["data"])
        key = (b["group"], info["plan"], info["L"])
        medians.setdefault(key, {})[info["provider"]] = (float(data.min()), float(np.median(data)))
    lines = []
    for group in dict.fromkeys(k[0] for k in medians):
        head = "| plan | L | " + " | ".join(providers) + " |"
        lines += [f"**{group}** (seconds per round, min / median; x = median over patchrec's)", "",
                  head, "|---|---:|" + "---:|" * len(providers)]  # fmt: skip
        for (g, plan, length), row in medians.items():
            if g != group:
                continue
            base = row.get("patchrec", (0.0, 0.0))[1]
            cells = []
            for p in providers:
                if p not in row:
                    cells.append("-")
                    continue
                low, mid = row[p]
                ratio = f" ({mid / base:.2f}x)" if base and p != "patchrec" else ""
                cells.append(f"{low:.3g} / {mid:.3g}{ratio}")
            lines.append(f"| {plan} | {length} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def compression_table(path: Path) -> str:
    """Does compression pay in proportion? From a training peer bench's JSON: per model and history length,
    patchrec's packed rows and median step of vanilla over PFT-I / PFT-S, and the step ratio over the row
    ratio (1: the step falls as fast as the rows; the efficiency issue asks >= 0.9 on real shapes)."""
    rows: dict[tuple, dict[str, tuple[int, float]]] = {}
    for b in checked_benchmarks(path):
        info = b["extra_info"]
        if info["provider"] == "patchrec":
            key = (info["model"], info["L"])
            step = float(np.median(b["stats"]["data"]))
            rows.setdefault(key, {})[info["plan"]] = (info["packed_rows"], step)
    lines = ["| model | L | plan | packed rows | vanilla / plan rows | median step (s) | vanilla / plan step "
             "| step ratio / row ratio |", "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (model, length), plans in rows.items():
        if "vanilla" not in plans:
            continue
        base_rows, base_step = plans["vanilla"]
        for plan, (count, step) in plans.items():
            row_ratio, step_ratio = base_rows / count, base_step / step
            lines.append(f"| {model} | {length} | {plan} | {count:,} | {row_ratio:.2f} | {step:.3f} | "
                         f"{step_ratio:.2f} | {step_ratio / row_ratio:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def exact_split_table(path: Path) -> str:
    """``benches/bench_exact_split.py``'s JSON: per model and layout, the catalog rows, the median round and
    the median seconds of each part over the rounds (prompt, catalog rows through the body, the head on
    them), with each part's share of the round; the parts' rounds must match the timed rounds."""
    lines = ["| model | layout | catalog rows | round min / median (s) | prompt (s) | catalog body (s) "
             "| catalog head (s) | other (s) |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for b in checked_benchmarks(path):
        info, data = b["extra_info"], np.asarray(b["stats"]["data"])
        split = info["split_per_round"]
        if len(split) != len(data):
            raise ValueError(f"{path}: {b['fullname']}: {len(split)} split rounds for {len(data)} "
                             "timed ones")
        mid = float(np.median(data))
        parts = {p: float(np.median([r[p] for r in split]))
                 for p in ("prompt", "catalog_body", "catalog_head")}  # fmt: skip
        other = float(np.median([t - sum(r.values()) for t, r in zip(data, split, strict=True)]))
        cells = " | ".join(f"{v:.3f} ({v / mid:.0%})" for v in parts.values())
        lines.append(f"| {info['model']} | {info['provider']} | {info['catalog_rows']:,} | "
                     f"{data.min():.3f} / {mid:.3f} | {cells} | {other:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def varlen_attention_table(path: Path) -> str:
    """``benches/bench_varlen_attention.py``'s JSON: per mode and provider, min / median milliseconds and the
    median's ratio to the run's baseline provider (``extra_info["reference"]``: ``cpu`` on a CPU) in the
    same mode, all from the per-round times."""
    rows, medians = [], {}
    for b in checked_benchmarks(path):
        info, data = b["extra_info"], np.asarray(b["stats"]["data"])
        medians[info["mode"], info["provider"]] = float(np.median(data))
        rows.append((info, data))
    lines = ["| mode | provider | rounds | min (ms) | median (ms) | median / baseline's |",
             "|---|---|---:|---:|---:|---:|"]
    for info, data in rows:
        base = medians.get((info["mode"], info["reference"]))
        if base is None:
            raise ValueError(f"{path}: no {info['reference']!r} ({info['mode']}) to divide by")
        mid = float(np.median(data))
        lines.append(f"| {info['mode']} | {info['provider']} | {len(data)} | {1e3 * data.min():.1f} | "
                     f"{1e3 * mid:.1f} | {mid / base:.2f}x |")
    return "\n".join(lines) + "\n"


def profile_table(path: Path) -> str:
    """``benches/profile_step.py``'s JSON: per configuration of the tiny training step, min / median step
    seconds (from its per-step times) and the profiled step split into the fixed cost (the ops on V-row
    tensors and the optimizer step) and the rest."""
    raw = _json(path)
    lines = ["| configuration | step min (s) | step median (s) | profiled step (s) | fixed cost (s) "
             "| rest (s) |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in raw["configs"]:
        times = sorted(c["step_times_s"])
        low, mid = times[0], times[len(times) // 2]  # the script's median: the upper one for an even count
        if not (_close(low, c["step_min_s"]) and _close(mid, c["step_median_s"])):
            raise ValueError(f"{path}: {c['config']}: stored step min / median differ from its step times")
        lines.append(f"| {c['config']} | {low:.3f} | {mid:.3f} | {c['profiled_step_s']:.3f} | "
                     f"{c['fixed_s']:.3f} | {c['rest_s']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def train_step_ratios(path: Path) -> str:
    """The training step's ratios of ``patchrec bench report`` (competitor median / patchrec median in the
    same run) as one row per plan and competitor, one column per history length."""
    records = [r for r in load_records([path]) if r.group == "train_step"]
    ratios = provider_ratios(records)
    lengths = sorted({r["L"] for r in ratios})
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for r in ratios:
        if r["reference"] != "patchrec":
            raise ValueError(f"{path}: train_step ratios divide by {r['reference']!r}, not patchrec")
        cells.setdefault((r["plan"], r["provider"]), {})[r["L"]] = r["time_ratio"]
    names = {"vanilla": "vanilla", "pft-i": "PFT-I", "pft-s": "PFT-S"}
    lines = ["| plan | " + " | ".join(f"L = {n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for (plan, provider), row in cells.items():
        values = " | ".join(f"{row[n]:.1f}x" if n in row else "-" for n in lengths)
        lines.append(f"| {names.get(plan, plan)}, vs {provider} | {values} |")
    return "\n".join(lines) + "\n"


def distributed_table(path: Path) -> str:
    """``benches/bench_distributed.py``'s JSON: per case, the cores it used and the samples/s the training run
    logged over its timed steps (the bench records them in ``extra_info``; the per-round times are the whole
    subprocess, start-up included, and are in the ``table`` block)."""
    lines = ["| case | cores used | samples/s | final loss |", "|---|---|---|---|"]
    for b in checked_benchmarks(path):
        info = b["extra_info"]
        cores = info["processes"] * info["threads_per_process"]
        lines.append(f"| {info['case']} | {cores} | {info['samples_per_s']:.1f} | {info['final_loss']:.6f} |")
    return "\n".join(lines) + "\n"


def baselines_table(path: Path) -> str:
    """``patchrec baseline MODEL --both-masks`` runs, one directory per model: per model and masking, the
    metrics recomputed from the per-sample ranks (``results_unmasked.json``, ``results_masked.json``) and the
    run's wall time."""
    lines = ["| model | masking | HR@10 | NDCG@10 | HR@20 | NDCG@20 | wall time |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    names = {"popularity": "popularity", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "hstu": "HSTU"}
    for label in ("unmasked", "masked"):
        for run in sorted((d for d in path.iterdir() if d.is_dir()), key=lambda d: list(names).index(d.name)):
            file = run / f"results_{label}.json"
            raw = _json(file)
            m = checked_metrics(raw, str(file), raw["ks"])
            wall = f"{raw['wall_seconds']:.0f} s" if label == "unmasked" else ""  # one run gives both
            lines.append(f"| {names[run.name]} | {label} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | "
                         f"{m['HR@20']:.4f} | {m['NDCG@20']:.4f} | {wall} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def gpu_plan_check_table(path: Path) -> str:
    """``benches/gpu_plan_check.py``'s JSON: per case the projected and measured FLOPs and peak memory. The
    totals and ratios are recomputed from the per-op FLOPs, the measured peak's categories and the projected
    memory components (``gpu_plan.projected_peak``); a case outside the check is marked, not hidden."""
    record = _json(path)
    lines = ["| model | plan | L | micro-batches | rows | projected TFLOP | measured / projected FLOPs | ops "
             "only the trace counts | projected peak MiB | measured peak MiB | measured / projected |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for case in record["cases"]:
        proj, meas = case["projected"], case["measured"]
        name = f"{path}: {case['model']} {case['plan']} L={case['L']} max_rows={case['max_rows']}"
        peak = {k: v for k, v in meas["memory_peak"].items() if k != "total"}
        total = projected_peak(proj["memory"], case["micro_batches"])
        sums = (sum(proj["flops_by_op"].values()), sum(meas["flops_by_op"].values()), sum(peak.values()))
        stored = (proj["flops"], meas["flops"], meas["memory_peak"]["total"])
        if sums != stored or total != proj["memory_total"]:
            raise ValueError(f"{name}: stored totals differ from their per-op / per-category sums")
        verdict = compare(proj, meas, record["tolerance"])
        if verdict["flops_only_measured"]:
            raise ValueError(f"{name}: the measured step counts ops the trace does not")
        if any(case[key] != value for key, value in verdict.items()):
            raise ValueError(f"{name}: the stored verdict differs from the one recomputed from its figures")
        equal = verdict["flops_equal_on_common_ops"]
        fits = equal and verdict["memory_within_tolerance"]
        only = ", ".join(o.removeprefix("patchrec.") for o in verdict["flops_only_projected"])
        lines.append(f"| {case['model']} | {case['plan']} | {case['L']} | {case['micro_batches']} | "
                     f"{case['rows']:,} | {proj['flops'] / 1e12:.4f} | {verdict['flops_ratio']:.6f}"
                     f"{'' if equal else ' (ops differ)'} | {only} | {total / 2**20:,.1f} | "
                     f"{sum(peak.values()) / 2**20:,.1f} | {verdict['memory_ratio']:.3f}"
                     f"{'' if fits else ' (outside the check)'} |")  # fmt: skip
    return "\n".join(lines) + "\n"
