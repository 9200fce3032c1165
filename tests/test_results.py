"""Every committed result under benches/results/ is registered, records its command, and its summaries and
the tables the docs quote are what its raw files give (``patchrec results check``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from patchrec.cli import main
from patchrec.reports.results_check import check

ROOT = Path(__file__).resolve().parents[1]


def test_every_committed_result_matches_its_raw_files():
    assert check(ROOT) == []


def test_a_tampered_number_is_caught(tmp_path, capsys):
    work = tmp_path / "repo"
    (work / "benches").mkdir(parents=True)
    shutil.copytree(ROOT / "benches" / "results", work / "benches" / "results")
    shutil.copytree(ROOT / "docs", work / "docs")
    shutil.copy(ROOT / "README.md", work / "README.md")
    assert main(["results", "check", "--root", str(work)]) == 0
    run = work / "benches" / "results" / "persrec-id-ml1m" / "runs" / "sasrec-full-seed0" / "results.json"
    result = json.loads(run.read_text())
    result["metrics"]["HR@20"] += 0.001  # a number that its ranks do not give
    run.write_text(json.dumps(result))
    assert main(["results", "check", "--root", str(work)]) == 1
    assert "HR@20" in capsys.readouterr().out
    (work / "benches" / "results" / "stray.json").write_text("{}")
    assert any("stray.json" in p and "not registered" in p for p in check(work))


def _tamper(work: Path, relative: str, change) -> None:
    path = work / "benches" / "results" / relative
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _round_time(raw):
    raw["benchmarks"][0]["stats"]["min"] *= 0.9  # a minimum that no round took


def _demo_metric(raw):
    raw["rows"][-1]["metrics"]["NDCG@10"] += 0.01


def _reproduce_metric(raw):
    raw["rows"][-1]["metrics"]["HR@20"] += 0.005  # the summary's, not its results file's


def _quoted_row(raw):
    raw["rows"][0]["ranks"][0] += 25  # a rank change moves the quoted table


def _plan_memory(raw):
    raw["cases"][0]["measured"]["memory_peak"]["activation"] += 2**20  # the total no longer adds up


@pytest.mark.parametrize(
    "relative,change,word",
    [("lora-smollm2-cpu.json", _round_time, "per-round times"),
     ("demo-cpu/results.json", _demo_metric, "NDCG@10"),
     ("reproduce-ml-100k-smollm2-cpu/summary.json", _reproduce_metric, "HR@20"),
     ("persrec-llm-demo/results.json", _quoted_row, "persrec-llm-demo"),
     ("gpu-plan-check-cpu.json", _plan_memory, "per-category sums")],
    ids=["benchmark-json", "demo", "reproduce", "llm-demo-docs-quote", "gpu-plan-check"],
)  # fmt: skip
def test_each_kind_of_result_catches_tampering(tmp_path, relative, change, word):
    # Only the tampered result is copied (the others are then reported missing, which names none of the words)
    work = tmp_path / "repo"
    entry = relative.split("/")[0]
    source, target = ROOT / "benches" / "results" / entry, work / "benches" / "results" / entry
    target.parent.mkdir(parents=True)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    shutil.copytree(ROOT / "docs", work / "docs")
    shutil.copy(ROOT / "README.md", work / "README.md")
    assert not any(word in p for p in check(work)), "the untampered copy must not name the word"
    _tamper(work, relative, change)
    problems = check(work)
    assert any(word in p for p in problems), problems
