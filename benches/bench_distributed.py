"""Data-parallel training throughput: training samples per second of one process against 2 ranks under
``torchrun`` (DDP and FSDP2, gloo on CPU / nccl on GPUs), the same global batch in every case.

Each case runs ``patchrec train`` as a subprocess (``torchrun --standalone`` for the ranks), so the
benchmark's own time is the whole command (start-up, tokenizer training, model writing included); the
training rate is read from the run's ``log.jsonl`` over steps 2..N (step 1 warms up allocators and caches):
``samples_per_s`` = samples of those steps / their training seconds (packing, forward, backward, all-reduce
or reduce-scatter, clipping, AdamW). ``extra_info`` also has rows/s and the load average when the case began.

CPU: the tiny preset (2 layers, hidden 128) on the default synthetic data, vanilla plan, 32 samples a step.
Every process runs one intra-op thread, plus one case of ONE process with as many threads as the ranks of
the other cases use cores, so that 2 ranks are compared with the same number of cores. On a shared 2-core
machine the 2 ranks compete with everything else that runs there; read the load average next to the rates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from machine import HAS_CUDA, device_name

STEPS = int(os.environ.get("PATCHREC_BENCH_DIST_STEPS", 12))
RANKS = 2
TRAIN = ["--stage", "vanilla", "--data", "synthetic", "--preset", "tiny", "--batch-size", "32",
         "--max-steps", str(STEPS), "--log-every", "1", "--no-progress"]  # fmt: skip
# (name, processes, intra-op threads per process, --parallel)
CASES = [
    ("1-process-1-thread", 1, 1, None),
    (f"1-process-{RANKS}-threads", 1, RANKS, None),
    (f"{RANKS}-ranks-ddp", RANKS, 1, "ddp"),
    (f"{RANKS}-ranks-fsdp", RANKS, 1, "fsdp"),
]
if HAS_CUDA:
    # The cases above are sized for CPU processes; on GPUs run torchrun with a real preset instead.
    pytest.skip("CPU bench (gloo ranks)", allow_module_level=True)


def _command(procs: int, parallel: str | None, out: Path) -> list[str]:
    train = [*TRAIN, "--out", str(out)]
    if procs == 1:
        return [sys.executable, "-m", "patchrec", "train", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", "patchrec", "train", *train, "--parallel", parallel]  # fmt: skip


def _rates(out: Path) -> dict[str, float]:
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "loss" in ln]
    timed = steps[1:]  # train_s is cumulative: steps 2..N took train_s[N] - train_s[1]
    seconds = steps[-1]["train_s"] - steps[0]["train_s"]
    return {"samples_per_s": sum(ln["samples"] for ln in timed) / seconds,
            "rows_per_s": sum(ln["rows"] for ln in timed) / seconds, "timed_steps": len(timed),
            "final_loss": steps[-1]["loss"]}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_train_samples_per_s(benchmark, tmp_path, case):
    name, procs, threads, parallel = case
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TRITON_INTERPRET": "0"}
    load = os.getloadavg()[0]
    runs = []

    def run():
        out = tmp_path / f"run{len(runs)}"
        proc = subprocess.run(_command(procs, parallel, out), env=env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs.append(out)

    benchmark.group = "distributed_train"
    benchmark.pedantic(run, rounds=1, iterations=1)
    rates = _rates(runs[-1])
    benchmark.extra_info.update(
        case=name, processes=procs, threads_per_process=threads, parallel=parallel or "none",
        cores=os.cpu_count(), load_average_1min=load, device=device_name(), steps=STEPS, batch_size=32,
        **rates,
    )  # fmt: skip
