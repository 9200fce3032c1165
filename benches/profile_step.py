"""Profile one training step of the tiny preset (CPU, one thread) and its fixed per-step cost, before and
after the changes that cut it; writes a torch.profiler table per configuration and a JSON summary.

The tiny preset ties a 128,259 x 128 table (16.4M of its 16.8M parameters) to the output head, so whatever
scales with the vocabulary V is paid every step whatever the batch: the head's matmuls and log-softmax on
the answer rows, the table's gradient, AdamW over the table. The fixed cost here is the self CPU time of
every op that reads or writes a tensor with V rows, plus the optimizer step's own time, per step.

Configurations (same samples, weights and losses):
- ``before``: the table's patch gradient dense (a zero [V, D] buffer plus a dense sum with the head's
  gradient) and torch's per-tensor AdamW loop (its CPU default): what a step did before;
- ``after``: patchrec's defaults: the patch gradient as sparse rows added into the head's dense gradient
  (``PackedDecoder.sparse_table_grad``), AdamW foreach; bitwise the same weights at one thread;
- ``after-fused``: ``after`` with ``--adamw fused`` (an explicit option: rounds differently).

Run (the efficiency script does; ``GLIBC_TUNABLES`` shows what glibc's allocator costs, see the output)::

    python benches/profile_step.py --out benches/results/profile-tiny-step
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import available, load, machine_info, pack, train_ids  # noqa: E402

from patchrec.data.dataset import make_samples  # noqa: E402
from patchrec.model.decoder import PackedDecoder  # noqa: E402
from patchrec.train.parallel import param_groups  # noqa: E402

CONFIGS = {"before": (False, dict(foreach=False)), "after": (True, dict(foreach=True)),
           "after-fused": (True, dict(fused=True))}  # fmt: skip


def make_step(setup, initial: dict, config: str, plan: str, length: int, batch: int):
    sparse, adamw = CONFIGS[config]
    model = setup.model
    model.load_state_dict(initial)  # every configuration starts from the same weights
    samples = make_samples(setup.dataset, "train", max_items=length)
    ids = train_ids(samples, length, batch)
    groups, _ = param_groups(model, 0.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, **adamw)
    sparse_grad = PackedDecoder.sparse_table_grad

    def step():
        PackedDecoder.sparse_table_grad = sparse_grad if sparse else (lambda self: False)
        try:
            optimizer.zero_grad(set_to_none=True)
            model(pack(setup, samples, ids, plan, length, answer=True), validate=False).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            optimizer.step()
        finally:
            PackedDecoder.sparse_table_grad = sparse_grad

    return step


def fixed_cost_us(events, vocab: int) -> float:
    """Self CPU microseconds of the events touching a V-row tensor, plus the optimizer step's own."""
    total = 0.0
    for event in events:
        rows = [shape[0] for shape in event.input_shapes if shape]
        if vocab in rows or event.key.startswith("Optimizer.step"):
            total += event.self_cpu_time_total
    return total


def run(config: str, args, setup, initial: dict) -> tuple[dict, str]:
    step = make_step(setup, initial, config, args.plan, args.length, args.batch)
    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    profiled_us = sum(e.self_cpu_time_total for e in events) / args.steps
    fixed_us = fixed_cost_us(events, setup.model.vocab_size) / args.steps
    summary = {"config": config, "step_min_s": min(times), "step_median_s": sorted(times)[len(times) // 2],
               "profiled_step_s": profiled_us / 1e6, "fixed_s": fixed_us / 1e6,
               "rest_s": (profiled_us - fixed_us) / 1e6, "step_times_s": times}  # fmt: skip
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45,
                         max_shapes_column_width=70)  # fmt: skip
    return summary, table


def header(result: dict, vocab: int) -> list[str]:
    r = result
    lines = [
        f"tiny preset training step, {r['plan']} L={r['L']}, {r['samples']} samples, CPU, one thread; "
        f"GLIBC_TUNABLES={r['glibc_tunables'] or '(unset)'}; load average "
        f"{r['load_average_before']:.2f} -> {r['load_average_after']:.2f} on {r['cores']} cores",
        f"fixed cost = self CPU time of the ops on a tensor with {vocab} (V) rows + the optimizer step's "
        "own, per step",
        "",
    ]
    for s in r["configs"]:
        lines.append(f"{s['config']:>12}: step min {s['step_min_s']:.3f} s, median {s['step_median_s']:.3f} "
                     f"s; profiled {s['profiled_step_s']:.3f} s = fixed {s['fixed_s']:.3f} s + rest "
                     f"{s['rest_s']:.3f} s")  # fmt: skip
    lines.append(f"fixed cost cut: after {100 * result['fixed_cost_cut_after']:.0f}%, after-fused "
                 f"{100 * result['fixed_cost_cut_after_fused']:.0f}%")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="output stem: writes STEM.txt and STEM.json")
    parser.add_argument("--plan", default="pft-s", choices=("vanilla", "pft-i", "pft-s"))
    parser.add_argument("--length", type=int, default=20, help="history items per sample (default 20)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed and profiled steps each (default 5)")
    parser.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    args = parser.parse_args()
    if available():
        raise FileNotFoundError(available())
    torch.set_num_threads(1)
    before = machine_info()
    setup = load("tiny")
    initial = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    summaries, tables = [], []
    for config in CONFIGS:
        summary, table = run(config, args, setup, initial)
        summaries.append(summary)
        tables.append(f"== {config} ==\n{table}")
    fixed = {s["config"]: s["fixed_s"] for s in summaries}
    result = {"plan": args.plan, "L": args.length, "samples": args.batch, "steps": args.steps,
              "vocab": setup.model.vocab_size, "configs": summaries,
              "fixed_cost_cut_after": 1 - fixed["after"] / fixed["before"],
              "fixed_cost_cut_after_fused": 1 - fixed["after-fused"] / fixed["before"],
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "load_average_before": before["load_average_1min"],
              "load_average_after": machine_info()["load_average_1min"], "cores": before["cores"],
              "threads": 1,
              "command": " ".join(["python", *sys.argv])}  # fmt: skip
    head = header(result, setup.model.vocab_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(head) + "\n\n" + "\n\n".join(tables) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(head))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
