"""The GPU step's estimator (``patchrec.experiments.gpu_plan``) checked where it can be: one training step of
a real model measured on this machine's CPU in fp32, against ``gpu_plan.trace_train`` of the same batches
traced on the meta device in fp32.

- FLOPs: torch's ``FlopCounterMode`` over the real step (forward, backward, clipping, AdamW) against the
  trace's count, op by op. The same formulas over the same shapes (the trace rescales attention to the exact
  pairs of the real offsets), so every op both count must agree exactly. Off the GPU (and without
  ``TRITON_INTERPRET=1``) ``patch_embed`` runs its plain-PyTorch reference, index ops that the counter
  counts as 0, while the trace takes the op's registered formula (2 FLOPs per token and column): that op
  is reported apart, a few parts per million of the step.
- Memory: torch.profiler's memory timeline of the real step (every CPU allocation, categorised by torch as
  parameter, optimizer state, gradient, activation, temporary ...) at its peak, against the trace's peak
  (``gpu_plan.projected_peak``: weights and AdamW's moments, plus the larger of the backward and the
  optimizer step).
  The trace leaves out temporaries inside an op and the logits' transient buffers, so the measured peak may
  be a little higher; the check allows ``MEMORY_TOLERANCE``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from patchrec.batching.pack import PackedBatch
from patchrec.experiments.gpu_plan import trace_train
from patchrec.model.decoder import PackedDecoder
from patchrec.train.config import TrainConfig
from patchrec.train.parallel import make_adamw, param_groups

MEMORY_TOLERANCE = 0.15  # |measured peak / projected peak - 1| the check accepts
# The CPU backend's attention ops are the same attention, counted by the same FLOP formula, as the reference
# ops a meta trace runs: the measured counts are filed under the reference's names so that the two pair up.
CPU_ATTENTION_OPS = {
    "patchrec.varlen_attention_cpu": "patchrec.varlen_attention",
    "patchrec.varlen_attention_cpu_backward": "patchrec.varlen_attention_backward",
}
# The columns of torch.profiler's memory timeline JSON after its leading zero column, in torch's order
# (torch.profiler._memory_profiler._CATEGORY_TO_COLORS); "unknown" is memory torch could not categorise.
TIMELINE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                       "autograd_detail", "unknown")  # fmt: skip


def _step(model: PackedDecoder, batches: list[PackedBatch], optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step over the micro-batches, as patchrec train runs it (gradients summed)."""
    for batch in batches:
        model(batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), TrainConfig.grad_clip)  # patchrec train's default
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_by_category(timeline: list) -> dict[str, int]:
    """The bytes per category at the moment the total is largest, from an exported memory timeline
    ``[times, sizes]``; ``total`` is their sum."""
    times, sizes = timeline
    if not sizes or len(sizes[0]) != len(TIMELINE_CATEGORIES) + 1:
        got = len(sizes[0]) if sizes else "no points"
        raise ValueError(f"memory timeline: expected {len(TIMELINE_CATEGORIES) + 1} columns per point "
                         f"(torch's categories changed?), got {got}")  # fmt: skip
    peak = max(sizes, key=sum)
    out = dict(zip(TIMELINE_CATEGORIES, (int(b) for b in peak[1:]), strict=True))
    out["total"] = sum(peak)
    return out


def measure_train_step(model: PackedDecoder, batches: list[PackedBatch]) -> dict[str, Any]:
    """FLOPs and the peak CPU memory by category of one optimizer step over ``batches`` (a second step: the
    first creates AdamW's moments, as the trace assumes). Steps the model's weights."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("measure_train_step measures a CPU run: move the model to the CPU")
    model.train()
    optimizer = make_adamw(param_groups(model, 0.0)[0], lr=1e-5)
    _step(model, batches, optimizer)
    with FlopCounterMode(display=False) as counter:
        _step(model, batches, optimizer)
    per_op: dict[str, int] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op).replace("::", ".").removesuffix(".default")
        name = CPU_ATTENTION_OPS.get(name, name)
        per_op[name] = per_op.get(name, 0) + int(flops)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:  # fmt: skip
        _step(model, batches, optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        # Deprecated in favour of CUDA's memory snapshots, which do not cover the CPU: still torch's only
        # public view of CPU allocations by category.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        peak = peak_by_category(json.loads(path.read_text()))
    return {"flops": counter.get_total_flops(), "flops_by_op": per_op, "memory_peak": peak,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def check_train_step(model: PackedDecoder, batches: list[PackedBatch]) -> dict[str, Any]:
    """The fp32 trace of ``batches`` next to the measured step: FLOPs (equal?) and peak memory (within
    ``MEMORY_TOLERANCE``?). ``model`` must be fp32 on the CPU; its weights are stepped."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("check_train_step compares an fp32 run with the fp32 trace: give an fp32 model")
    traced = trace_train(model.config, model.vocab_size, batches, torch.float32)
    step = measure_train_step(model, batches)
    projected = {"flops": traced["flops"], "memory": traced["memory"], "memory_total": traced["memory_total"],
                 "flops_by_op": {name: op["flops"] for name, op in traced["ops"].items() if op["flops"]}}
    measured = {key: step[key] for key in ("flops", "flops_by_op", "memory_peak")}
    return {"rows": traced["rows"], "labels": traced["labels"], "params": step["params"],
            "projected": projected, "measured": measured, **compare(projected, measured)}  # fmt: skip


def compare(projected: dict[str, Any], measured: dict[str, Any],
            tolerance: float = MEMORY_TOLERANCE) -> dict[str, Any]:  # fmt: skip
    """The verdict on one case from its projected (``flops``, ``flops_by_op``, ``memory_total``) and measured
    (``flops``, ``flops_by_op``, ``memory_peak``) figures: FLOPs equal on every op both count, the ops only
    one side counts, and the ratios of the totals and of the peaks."""
    traced, counted = projected["flops_by_op"], measured["flops_by_op"]
    common = set(traced) & set(counted)
    ratio = measured["memory_peak"]["total"] / projected["memory_total"]
    return {"flops_equal_on_common_ops": all(traced[n] == counted[n] for n in common),
            "flops_only_projected": {n: traced[n] for n in sorted(set(traced) - common)},
            "flops_only_measured": {n: counted[n] for n in sorted(set(counted) - common)},
            "flops_ratio": measured["flops"] / projected["flops"], "memory_ratio": ratio,
            "memory_within_tolerance": abs(ratio - 1) <= tolerance}  # fmt: skip
