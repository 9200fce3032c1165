"""Every committed result under benches/results/ is registered, records its command, and its summaries and
the tables the docs quote are what its raw files give (``patchrec results check``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
