"""The one-command GPU check (``bash benches/gpu_check.sh``, ``patchrec bench gpu``) on a machine without a
GPU: its dry run, its refusal to run without CUDA, and its step runner and results writer on stand-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchrec.cli import main as cli
from patchrec.commands.bench import _gpu_check

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["install-flash-attn", "install-gguf", "environment", "gpu-tests", "kernel-tests", "kernel-benches",
         "smollm2", "train-step", "inference", "compile-report"]  # fmt: skip


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "never-written"
    proc = subprocess.run(["bash", "benches/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    positions = [text.index(f". {name} (") for name in STEPS]
    assert positions == sorted(positions)
    wanted = ["-m gpu tests", "bench_hbm_copy.py", "bench_patch_embed.py", "bench_varlen_attention.py",
              "test_train_step[pft-s-200-authors-loop]", "bench_inference.py", "test_gpu_real_model.py",
              "patchrec bench report", f"{out}/gpu.json"]  # fmt: skip
    for expected in wanted:
        assert expected in text, expected
    assert not out.exists()


def test_patchrec_bench_gpu_is_the_same_check(capsys):
    assert cli(["bench", "gpu", "--dry-run", "--budget-s", "300", "--skip-install"]) == 0
    text = capsys.readouterr().out
    assert "budget 300 s" in text and "install-flash-attn" not in text and ". gpu-tests (" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_check_refuses(capsys):
    assert cli(["bench", "gpu", "--skip-install"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _script(tmp_path: Path, name: str, code: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    return [sys.executable, str(path)]


def test_steps_run_within_the_budget_and_results_are_written(tmp_path, monkeypatch):
    check = _gpu_check()
    out = tmp_path / "gpu-test"
    (out / "logs").mkdir(parents=True)
    bench = {"machine_info": {"node": "x"}, "benchmarks": [
        {"name": "test_hbm_copy_bandwidth", "group": "hbm_copy", "stats": {"median": 1e-3},
         "extra_info": {"provider": "copy", "gb_per_s": 2000.0}},
        {"name": "test_patch_embed_throughput[pft_s-triton-fwd]", "group": None, "stats": {"median": 2e-3},
         "extra_info": {"provider": "triton", "mode": "fwd", "gb_per_s": 1500.0}},
    ]}  # fmt: skip
    junit = ('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"></testsuite></testsuites>')
    write = lambda rel, text: f"open({str(out / rel)!r}, 'w').write({text!r})"
    steps = [
        check.Step("benches", "writes a benchmark JSON",
                   _script(tmp_path, "b", write("logs/b.json", json.dumps(bench))), 30,
                   bench_json="logs/b.json"),
        check.Step("tests", "writes a JUnit file with a failure",
                   _script(tmp_path, "t", write("logs/t.xml", junit) + "; exit(1)"), 30, junit="logs/t.xml"),
        check.Step("slow", "runs past its limit; pytest would write its JSON on SIGINT",
                   _script(tmp_path, "s", "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
                                          f"    open({str(out / 'logs/interrupted')!r}, 'w')\n"),
                   3),  # seconds: long enough for the interpreter to start under load and reach try
        check.Step("late", "does not fit the budget", [sys.executable, "-c", "pass"], 30),
    ]  # fmt: skip
    monkeypatch.setattr(check, "MIN_STEP_S", 0.5)
    results = [check.run_step(step, out, deadline) for step, deadline in zip(
        steps, [float("inf")] * 3 + [0.0], strict=True)]  # fmt: skip
    assert [r["status"] for r in results] == ["passed", "failed", "timed out", "not run"]
    assert results[1]["tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 2}
    assert (out / "logs" / "interrupted").exists()  # stopped with SIGINT first
    (out / "logs" / "environment.json").write_text(json.dumps({"device": "Test GPU", "torch": "2.x"}))

    path = check.write_results(out, steps, results, budget_s=570, seconds=12.3)
    data = json.loads(path.read_text())
    assert data["gpu_check"]["ok"] is False and data["gpu_check"]["copy_gb_per_s"] == 2000.0
    assert data["gpu_check"]["environment"]["device"] == "Test GPU"
    assert [b["extra_info"].get("fraction_of_copy") for b in data["benchmarks"]] == [None, 0.75]
    summary = (out / "gpu_check.md").read_text()
    assert "# GPU check: Test GPU" in summary and "| tests | failed | " in summary and "| 0.75 |" in summary
