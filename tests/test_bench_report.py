"""``patchrec bench report`` on a small synthetic pytest-benchmark JSON (the real file layout)."""

from __future__ import annotations

import json

import pytest

from patchrec.reports.bench_report import load_records, plan_ratios, provider_ratios, write_report


def _stats(median: float) -> dict:
    return {
        "min": median * 0.9, "max": median * 1.1, "mean": median, "stddev": 0.0, "rounds": 2,
        "median": median,
        "iqr": 0.0, "q1": median, "q3": median, "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0",
        "ld15iqr": median, "hd15iqr": median, "ops": 1 / median, "total": 2 * median, "iterations": 1,
    }  # fmt: skip


def _bench(group: str, name: str, median: float, **extra) -> dict:
    return {
        "group": group, "name": name, "fullname": f"benches/x.py::{name}", "params": None, "param": None,
        "extra_info": extra, "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5,
                                         "max_time": 1.0, "min_time": 5e-06, "warmup": False},
        "stats": _stats(median),
    }  # fmt: skip


# train_step: patchrec 0.1 s / 0.2 s; hf-padded 4x and 3x slower; authors-loop 10x at L=20 only.
TRAIN = [
    ("patchrec", "vanilla", 20, 0.2, 1000),
    ("hf-padded", "vanilla", 20, 0.8, 4000),
    ("patchrec", "pft-i", 20, 0.1, 500),
    ("hf-padded", "pft-i", 20, 0.3, 2000),
    ("authors-loop", "pft-i", 20, 1.0, 3000),
    ("patchrec", "pft-i", 50, 0.2, 800),
    ("hf-padded", "pft-i", 50, 0.6, 2400),
]


@pytest.fixture
def results(tmp_path):
    benches = [
        _bench("train_step", f"test_train_step[{plan}-{L}-{prov}]", med, provider=prov, plan=plan, L=L,
               items_per_s=4 * L / med, peak_mem_bytes=mem * 2**20, device="cpu")
        for prov, plan, L, med, mem in TRAIN
    ]  # fmt: skip
    benches += [
        _bench("inference_rank", f"test_rank[{plan}-{L}]", lat, provider="patchrec", plan=plan, L=L,
               items_per_s=L / lat, latency_per_user_s=lat, max_items_in_budget=n, rows_per_history_item=r,
               budget="1 GiB KV cache", device="cpu")
        for plan, L, lat, n, r in [("vanilla", 350, 2.0, 6624, 4.9), ("pft-i", 350, 0.5, 16332, 2.0),
                                   ("pft-s", 1435, 0.4, 325880, 0.1)]
    ]  # fmt: skip
    benches += [
        _bench("eval_cost", f"test_eval_cost[{p}]", med, provider=p, reference="exact", plan="pft-s", L=100,
               latency_per_user_s=med / 2, device="cpu")
        for p, med in [("exact", 20.0), ("beam", 0.5)]
    ]  # fmt: skip
    benches.append(_bench("patch_embed", "test_patch_embed_throughput[x]", 0.01))  # no provider/plan keys
    data = {
        "machine_info": {"node": "ci", "processor": "x86_64", "machine": "x86_64", "python_version": "3.11",
                         "cpu": {"brand_raw": "Test CPU", "count": 2}},
        "commit_info": {"id": "abc", "dirty": True, "branch": "main"},
        "benchmarks": benches,
        "datetime": "2026-11-24T08:00:00",
        "version": "5.3.1",
    }  # fmt: skip
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    return path


def test_provider_ratios(results):
    train = [r for r in load_records([results]) if r.group == "train_step"]
    got = {(d["plan"], d["L"], d["provider"]): d for d in provider_ratios(train)}
    expected = {("vanilla", 20, "hf-padded"), ("pft-i", 20, "hf-padded"), ("pft-i", 20, "authors-loop")}
    assert set(got) == expected | {("pft-i", 50, "hf-padded")}
    assert got[("vanilla", 20, "hf-padded")]["time_ratio"] == pytest.approx(4.0)
    assert got[("pft-i", 20, "hf-padded")]["time_ratio"] == pytest.approx(3.0)
    assert got[("pft-i", 20, "authors-loop")]["time_ratio"] == pytest.approx(10.0)
    assert got[("pft-i", 20, "authors-loop")]["mem_ratio"] == pytest.approx(6.0)
    assert got[("pft-i", 50, "hf-padded")]["time_ratio"] == pytest.approx(3.0)


def test_plan_ratios_and_reference(results):
    records = load_records([results])
    train = [r for r in records if r.group == "train_step"]
    speedups = {(d["provider"], d["L"], d["plan"]): d["speedup"] for d in plan_ratios(train)}
    assert speedups == {
        ("patchrec", 20, "pft-i"): pytest.approx(2.0),
        ("hf-padded", 20, "pft-i"): pytest.approx(8 / 3),
    }
    evals = provider_ratios([r for r in records if r.group == "eval_cost"])
    assert [(d["reference"], d["provider"]) for d in evals] == [("exact", "beam")]
    assert evals[0]["time_ratio"] == pytest.approx(0.025)


def test_report_markdown_and_plots(results, tmp_path):
    from patchrec.cli import main

    out = tmp_path / "report"
    assert main(["bench", "report", str(results), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    # The vanilla L=20 row: patchrec 200 ms, hf-padded 800 ms, 4.00x, memory 4.00x; no authors-loop there.
    assert "| vanilla | 20 | 200.0 | - | - | - | 800.0 | 4.00x | 4.00x |" in text
    assert "| pft-i | 20 | 100.0 | 1,000.0 | 10.00x | 6.00x | 300.0 | 3.00x | 4.00x |" in text
    assert "| patchrec | 20 | pft-i | 200.0 | 100.0 | 2.00x |" in text
    assert "| pft-s | 0.1 | 325,880 |" in text
    assert "test_patch_embed_throughput[x]" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "cpu_eval_cost_latency.png",
        "cpu_inference_rank_latency.png",
        "cpu_train_step_memory.png",
        "cpu_train_step_throughput.png",
    ]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_report_rejects_bad_input(tmp_path):
    from patchrec.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no": "benchmarks"}))
    assert main(["bench", "report", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["bench", "report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="no benchmarks"):
        write_report([_empty(tmp_path)], tmp_path / "o")


def _empty(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": [], "machine_info": {}}))
    return path
