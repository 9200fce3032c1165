"""``patchrec bench plan-gpu``'s estimator checked against measured CPU steps of the two real-shape models
(``patchrec.experiments.gpu_plan_check``): the tiny preset (Llama-3 vocabulary) and SmolLM2-135M (the GGUF in
../shared), vanilla / PFT-I / PFT-S, L = 50 and 100, 4 seeded ML-1M training samples a step in one
micro-batch, and at L = 100 also split into micro-batches of at most 700 rows (the gradients then coexist
with the activations). Each case: the fp32 trace of exactly the batches the real step runs, its FLOPs op by op
against torch's FlopCounterMode over the real step, and its peak memory against the profiler's measured peak.
Memory and FLOPs do not depend on the machine's load, so this may run beside other work.

    python benches/gpu_plan_check.py --out benches/results/gpu-plan-check-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from peers import available, load

from patchrec.data.dataset import make_samples
from patchrec.experiments import gpu_plan
from patchrec.experiments.gpu_plan_check import MEMORY_TOLERANCE, check_train_step

PLANS = ("vanilla", "pft-i", "pft-s")
LENGTHS = (50, 100)
BATCH = 4  # training samples a step
SPLIT_ROWS = 700  # the micro-batch budget of the split cases (the longest vanilla sample at L = 100: 489)


def cases(models: list[str]) -> list[tuple[str, str, int, int]]:
    """(model, plan, L, max_rows): one micro-batch each, and the L = 100 steps split into micro-batches."""
    one = [(m, p, length, 1 << 20) for m in models for length in LENGTHS for p in PLANS]
    return one + [(m, p, 100, SPLIT_ROWS) for m in models for p in PLANS]


def run_case(model_name: str, plan: str, length: int, max_rows: int) -> dict:
    setup = load(model_name)
    settings = gpu_plan.StepSettings(plan, length, 5, 5, batch_size=BATCH, max_rows=max_rows)
    batches = gpu_plan.train_batches(make_samples(setup.dataset, "train", length), setup.tokens, settings)
    start = time.perf_counter()
    out = check_train_step(setup.model, batches)  # steps the weights: flops and memory do not depend on them
    return {"model": model_name, "plan": plan, "L": length, "max_rows": max_rows,
            "micro_batches": len(batches), "vocab": int(setup.model.vocab_size), **out,
            "seconds": time.perf_counter() - start}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    args = parser.parse_args()
    why = available()
    if why:
        raise SystemExit(f"cannot run: {why}")
    torch.set_num_threads(1)
    results = []
    for case in cases(args.models):
        results.append(run_case(*case))
        r = results[-1]
        print(f"{r['model']} {r['plan']} L={r['L']} micro-batches {r['micro_batches']}: FLOPs measured / "
              f"projected {r['flops_ratio']:.6f}, peak memory {r['memory_ratio']:.3f}",
              flush=True)  # fmt: skip
    record = {"command": " ".join(["python", *sys.argv]), "tolerance": MEMORY_TOLERANCE,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cores": torch.get_num_threads(), "torch": torch.__version__},
              "cases": results}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    bad = [r for r in results if not (r["flops_equal_on_common_ops"] and r["memory_within_tolerance"])]
    print(f"wrote {args.out}: {len(results) - len(bad)} of {len(results)} cases within the check")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
