"""Every committed result recomputed from its raw files, and every result table quoted in the docs checked
against that recomputation (``patchrec results check``).

A result is a directory or file under ``benches/results/`` holding the exact command that wrote it, its
configuration, its raw data (per-sample ranks, or per-round timings) and a summary. Each one is registered
in ``RESULTS`` with a renderer that recomputes its tables (markdown blocks) from the raw data alone. The check
fails when

- a registered result is missing, or records no command;
- a stored metric differs from the one recomputed from its ranks (the renderers check as they read);
- a summary file of the result differs from its recomputed block;
- a docs page quotes a block (between ``<!-- result: NAME/BLOCK -->`` and ``<!-- /result -->``) whose text
  differs from the recomputed one;
- a file or directory under ``benches/results/`` is not registered (new results must be).

``patchrec results render NAME`` prints a result's blocks, ready to paste into a page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchrec.reports.persrec_tables import (
    horizon_table,
    persrec_id_pairs,
    persrec_id_summary,
    persrec_id_table,
    staleness_rows,
    staleness_table,
)
from patchrec.reports.recorded_tables import (
    baselines_table,
    bench_report,
    benchmark_command,
    benchmark_table,
    compression_table,
    demo_tables,
    distributed_table,
    dry_runs,
    exact_split_table,
    gpu_plan_check_table,
    llm_persrec_tables,
    lora_table,
    peers_table,
    persrec_latency_tables,
    profile_table,
    reproduce_tables,
    train_step_ratios,
    varlen_attention_table,
)
from patchrec.reports.serve_tables import serve_ratios, serve_summary, serve_table

RESULTS_DIR = Path("benches") / "results"
BLOCK = re.compile(r"<!-- result: (\S+?)/(\S+) -->\n(.*?)<!-- /result -->", flags=re.S)


@dataclass(frozen=True)
class Result:
    name: str  # the entry under benches/results/
    render: Callable[[Path], dict[str, str]]  # raw files -> {block name: markdown}
    summaries: dict[str, str] = field(default_factory=dict)  # file in the result -> the block it must equal
    command: Callable[[Path], str | None] = lambda path: None  # the recorded command, None if missing


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _summary_command(path: Path) -> str | None:
    for name in ("summary.json", "horizon.json"):
        if (path / name).is_file():
            return _json(path / name).get("command")
    return None


def _persrec_id(path: Path) -> dict[str, str]:
    args = _json(path / "summary.json")["args"]
    summary = persrec_id_summary(path / "runs", args["models"], args["variants"], args["seeds"])
    table, pairs = persrec_id_table(summary), persrec_id_pairs(summary)
    return {"table": table, "pairs": pairs, "summary": table + "\n" + pairs}


def _staleness(path: Path) -> dict[str, str]:
    names = _json(path / "summary.json")["args"]["names"]
    results = []
    for name in names:
        raw = _json(path / f"{name}.json")
        ranks = {int(m): np.asarray(r) for m, r in raw["ranks"].items()}
        results.append(raw | {"rows": staleness_rows(ranks, raw["lags"])})
    return {"table": staleness_table(results)}


def _horizon(path: Path) -> dict[str, str]:
    return {"table": horizon_table(_json(path / "horizon.json")["results"])}


def _serve(path: Path) -> dict[str, str]:
    points = _json(path / "serve.json")["points"]
    table, ratios = serve_table(serve_summary(points)), serve_ratios(points)
    return {"table": table, "ratios": ratios, "summary": table + "\n" + ratios}


def _file_command(name: str) -> Callable[[Path], str | None]:
    return lambda path: _json(path / name).get("command") if (path / name).is_file() else None


def _benchmark(*extra: tuple[str, Callable[[Path], str]]) -> Callable[[Path], dict[str, str]]:
    """A pytest-benchmark JSON's renderer: its per-round table and a block per (name, table) in ``extra``."""
    return lambda path: {"table": benchmark_table(path)} | {name: table(path) for name, table in extra}


def _bench_report(path: Path) -> dict[str, str]:
    return {"report": bench_report(path, path.parent / "cpu.json")}


def _llm_persrec(path: Path) -> dict[str, str]:
    return llm_persrec_tables(path / "results.json")


def _efficiency(path: Path) -> dict[str, str]:
    blocks = {part: peers_table(path / f"peers_{part}.json") for part in ("train", "prefill", "beam")
              if (path / f"peers_{part}.json").is_file()}  # fmt: skip
    if (path / "peers_train.json").is_file():
        blocks["compression"] = compression_table(path / "peers_train.json")
    if (path / "profile-tiny-step.json").is_file():
        blocks["profile"] = profile_table(path / "profile-tiny-step.json")
    if not blocks:
        raise ValueError(f"{path}: no peers_*.json or profile-tiny-step.json")
    return blocks


def _run_txt_command(path: Path) -> str | None:
    lines = (path / "run.txt").read_text().splitlines() if (path / "run.txt").is_file() else []
    return next((line.removeprefix("command: ") for line in lines if line.startswith("command: ")), None)


def _baselines(path: Path) -> dict[str, str]:
    return {"table": baselines_table(path)}


def _commands_txt(path: Path) -> str | None:
    return (path / "commands.txt").read_text() if (path / "commands.txt").is_file() else None


def _demo(path: Path) -> dict[str, str]:
    blocks = demo_tables(path / "results.json")
    return blocks | {"summary": blocks["table"] + "\n" + blocks["pairs"]}


RESULTS: dict[str, Result] = {
    r.name: r
    for r in (
        Result("cpu.json", _benchmark(("train_step_ratios", train_step_ratios)), {}, benchmark_command),
        *(Result(name, _benchmark(("samples_per_s", distributed_table)), {}, benchmark_command)
          for name in ("distributed-cpu.json", "distributed-cpu-rerun.json")),  # fmt: skip
        Result("cpu-report", _bench_report, {"report.md": "report"},
               lambda path: benchmark_command(path.parent / "cpu.json")),  # fmt: skip
        Result("reproduce-ml-100k-smollm2-cpu", reproduce_tables, {"summary.md": "summary"},
               _file_command("summary.json")),  # fmt: skip
        Result("reproduce-dry-run", dry_runs,
               {f"{d}/dry_run.md": d for d in ("goodreads", "ml-100k", "ml-1m")},
               lambda path: _json(path / "ml-1m" / "dry_run.json").get("command")),  # fmt: skip
        Result("lora-smollm2-cpu.json", _benchmark(("lora", lora_table)), {}, benchmark_command),
        Result("persrec-latency-cpu.json", persrec_latency_tables, {}, benchmark_command),
        Result("persrec-llm-demo", _llm_persrec, {}, _file_command("results.json")),
        Result("efficiency-cpu", _efficiency, {}, _run_txt_command),
        Result("efficiency-smollm2", _efficiency, {}, _run_txt_command),
        Result("efficiency-smollm2-recheck", _efficiency, {}, _run_txt_command),
        Result("exact-split-cpu.json", _benchmark(("split", exact_split_table)), {}, benchmark_command),
        Result("varlen-attention-cpu.json", _benchmark(("providers", varlen_attention_table)), {},
               benchmark_command),
        Result("baselines-ml100k", _baselines, {}, _commands_txt),
        Result("demo-cpu", _demo, {"summary.md": "summary"}, _file_command("results.json")),
        Result("persrec-id-ml1m", _persrec_id, {"summary.md": "summary"}, _summary_command),
        Result("persrec-staleness-ml1m", _staleness, {"summary.md": "table"}, _summary_command),
        Result("persrec-horizon-ml1m", _horizon, {"summary.md": "table"}, _summary_command),
        Result("serve-cpu", _serve, {"summary.md": "summary"}, _file_command("serve.json")),
        Result("gpu-plan-check-cpu.json", lambda path: {"table": gpu_plan_check_table(path)}, {},
               lambda path: _json(path).get("command")),  # fmt: skip
    )
}


def render(root: Path, name: str) -> dict[str, str]:
    """The recomputed blocks of result ``name`` of the repository at ``root``."""
    if name not in RESULTS:
        raise ValueError(f"unknown result {name!r}; registered: {', '.join(sorted(RESULTS))}")
    path = root / RESULTS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: registered result {name!r} is missing")
    return RESULTS[name].render(path)


def check(root: Path, pages: list[Path] | None = None) -> list[str]:
    """Every problem found (empty when all is well); see the module docstring."""
    root = Path(root)
    problems, blocks = [], {}
    for name, result in RESULTS.items():
        path = root / RESULTS_DIR / name
        try:
            blocks[name] = render(root, name)
        except (ValueError, FileNotFoundError, KeyError) as err:
            problems.append(f"{name}: {err}")
            continue
        if not result.command(path):
            problems.append(f"{name}: no command recorded")
        for file, block in result.summaries.items():
            if (path / file).read_text() != blocks[name][block]:
                problems.append(f"{name}/{file} differs from the table recomputed from its raw files")
    for entry in sorted((root / RESULTS_DIR).iterdir()) if (root / RESULTS_DIR).is_dir() else []:
        if entry.name not in RESULTS:
            problems.append(f"{RESULTS_DIR / entry.name}: not registered in patchrec.reports.results_check")
    if pages is None:
        pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        for name, block, text in BLOCK.findall(page.read_text()):
            want = blocks.get(name, {}).get(block)
            if want is None:
                problems.append(f"{page.name}: quotes {name}/{block}, which is not a recomputed block")
            elif text != want:
                problems.append(f"{page.name}: {name}/{block} differs from its recomputation")
    return problems
