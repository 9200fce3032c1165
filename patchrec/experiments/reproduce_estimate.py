"""Sizes and costs of a ``patchrec reproduce`` run before it runs: the model's parameters, checkpoint bytes
and cadence, LLM positions per stage and per evaluation, and the GPU hours they come to under a stated
throughput (``--dry-run``; estimates, never measurements).

Counting. A training stage processes, per sample, the packed rows of each of its views (prompt, history after
compression, answer; a patch is one row), counted by planning a seeded subset of its samples with the stage's
plan (random plans at curriculum p spread over 0..1 as in training). FLOPs follow the usual 6 x parameters
per token for training and 2 x for inference, split the way the packed path computes: the decoder body on
every row, the ``vocab x hidden`` output layer only where logits are taken (answer tokens in training; every
scored row in evaluation). Attention's own FLOPs (a few % at these lengths) are left out.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchrec.batching.pack import PLAN_CHUNK, Packer
from patchrec.batching.plan import Planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Samples
from patchrec.model.backbone import causal_lm_class, check_architecture, read_config

# fp32 weights (4 bytes) + AdamW's two fp32 moments (8 bytes) per parameter: what a checkpoint holds.
CHECKPOINT_BYTES_PER_PARAM = 12
MODEL_BYTES_PER_PARAM = 4  # a stage's final model/ (fp32, the next stage's master weights)
ESTIMATE_SAMPLES = 20_000  # samples planned per stage estimate (all of them when fewer)


@dataclass(frozen=True)
class ModelSize:
    params: int  # all parameters (the history markers' rows included)
    body_params: int  # decoder layers and final norm: what every packed row goes through
    head_params: int  # vocab x hidden: the output layer, applied only where logits are taken

    @property
    def checkpoint_bytes(self) -> int:
        return CHECKPOINT_BYTES_PER_PARAM * self.params

    @property
    def model_bytes(self) -> int:
        return MODEL_BYTES_PER_PARAM * self.params


def model_size(backbone: str | Path, vocab_size: int) -> ModelSize:
    """Parameter counts of ``backbone`` (HF directory or .gguf) resized to ``vocab_size``, from its config
    alone: the model of its family is built on the meta device, no weights are read."""
    config = copy.deepcopy(read_config(backbone))
    check_architecture(config, backbone)
    config.vocab_size = vocab_size
    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    params = sum(p.numel() for p in model.parameters())  # a tied output layer counts once
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = params - embed.numel() - (0 if head is embed else head.numel())
    return ModelSize(params, body, head.numel())


def save_every(steps: int, per_stage: int) -> int:
    """Steps between checkpoints for ``per_stage`` checkpoints over a stage of ``steps`` (0: none)."""
    return 0 if per_stage <= 0 else max(1, math.ceil(steps / per_stage))


def checkpoint_plan(size: ModelSize, steps: int, per_stage: int, keep: int) -> dict[str, Any]:
    every = save_every(steps, per_stage)
    count = steps // every if every else 0
    gb = size.checkpoint_bytes / 1e9
    return {"save_every": every, "checkpoints": count, "keep": keep, "checkpoint_gb": gb,
            "written_gb": count * gb, "peak_gb": min(count, keep) * gb}  # fmt: skip


def format_checkpoint_plan(size: ModelSize, plan: dict[str, Any], stages: int) -> str:
    return (f"checkpoints: {size.params / 1e9:.3g}B parameters -> {plan['checkpoint_gb']:.3g} GB each "
            f"(fp32 weights + AdamW moments), every {plan['save_every']} steps = {plan['checkpoints']} per "
            f"stage, the newest {plan['keep']} kept ({plan['peak_gb']:.3g} GB at most) and deleted once the "
            f"stage's model is written ({size.model_bytes / 1e9:.3g} GB each, fp32); {stages} stage(s) to "
            "train")


def _plan_rows(samples: Samples, ids: np.ndarray, planner: Planner, tokens: TokenizedDataset, seed: int,
               answer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per sample of ``ids``: packed rows over all views, answer labels over all views, history title tokens
    after compression (last view). Random plans draw p uniformly in [0, 1) per sample: the curriculum a
    stage spreads over its steps."""
    packer = Packer(tokens, answer=answer)
    rng = np.random.default_rng(seed)
    rows, labels, after = (np.zeros(len(ids), dtype=np.int64) for _ in range(3))
    views = planner.views
    for lo in range(0, len(ids), PLAN_CHUNK):
        chunk = ids[lo : lo + PLAN_CHUNK]
        s = packer.plan_slots(samples, chunk, planner, rng, rng.random(len(chunk)))
        part = slice(lo, lo + len(chunk))
        rows[part] = s.rows.reshape(-1, views).sum(axis=1)
        lab = (s.ntok[:, -1] + 1) if answer else np.zeros(len(s), dtype=np.int64)
        labels[part] = lab.reshape(-1, views).sum(axis=1)
        after[part] = s.after.reshape(-1, views)[:, -1]
    return rows, labels, after


def stage_cost(samples: Samples, planner: Planner, tokens: TokenizedDataset, size: ModelSize, *,
               seed: int = 0, estimate_samples: int = ESTIMATE_SAMPLES) -> dict[str, Any]:  # fmt: skip
    """LLM positions, answer tokens and training FLOPs of one pass over ``samples`` with ``planner``."""
    n = len(samples)
    ids = np.arange(n)
    if n > estimate_samples:
        ids = np.sort(np.random.default_rng(seed).choice(n, estimate_samples, replace=False))
    rows, labels, _ = _plan_rows(samples, ids, planner, tokens, seed, answer=True)
    per_rows, per_labels = float(rows.mean()) if n else 0.0, float(labels.mean()) if n else 0.0
    total_rows, total_labels = per_rows * n, per_labels * n
    tflop = (6 * size.body_params * total_rows + 6 * size.head_params * total_labels) / 1e12
    return {"views": planner.views, "rows_per_sample": per_rows, "rows": total_rows, "labels": total_labels,
            "estimated_from": len(ids), "tflop": tflop}  # fmt: skip


def eval_cost(samples: Samples, planner: Planner, tokens: TokenizedDataset, size: ModelSize, *, beams: int,
              exact: bool) -> dict[str, Any]:  # fmt: skip
    """Rows and inference FLOPs of ranking ``samples``: each prompt once (prefill), then the beam search's
    ``beams`` rows for at most the longest title's tokens (an upper bound: groups finish early), and with
    ``exact`` every distinct title + eot continued from the prompt."""
    prompt, _, _ = _plan_rows(samples, np.arange(len(samples)), planner, tokens, 0, answer=False)
    lengths = tokens.titles.lengths
    _, first = np.unique(np.asarray(samples.dataset.titles, dtype=object), return_index=True)
    prefill = float(prompt.sum())
    beam_rows = float(beams * lengths.max(initial=0) * len(samples))
    exact_rows = float((lengths[first] + 1).sum() * len(samples)) if exact else 0.0

    def tflop(scored: float) -> float:
        return (2 * size.body_params * prefill + 2 * (size.body_params + size.head_params) * scored) / 1e12

    out = {"samples": len(samples), "prompt_rows_per_sample": prefill / max(len(samples), 1),
           "beam_rows": beam_rows, "beam_tflop": tflop(beam_rows)}  # fmt: skip
    if exact:
        out.update(exact_rows=exact_rows, exact_tflop=tflop(exact_rows))
    return out


def history_cost(samples: Samples, planner: Planner, tokens: TokenizedDataset) -> dict[str, float]:
    """Mean history title tokens after compression and mean prompt rows (history included) per sample."""
    rows, _, after = _plan_rows(samples, np.arange(len(samples)), planner, tokens, 0, answer=False)
    return {"history_tokens": float(after.mean()) if len(after) else 0.0,
            "prompt_rows": float(rows.mean()) if len(rows) else 0.0}  # fmt: skip


@dataclass(frozen=True)
class Throughput:
    """The sustained throughput a GPU-hour estimate assumes (never measured by patchrec)."""

    train_tflops: float = 300.0  # training, per GPU: ~30% of an H100 SXM's 989 dense bf16 TFLOP/s
    eval_tflops: float = 100.0  # ranking, per GPU: beam search's small decode steps run far below peak

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"assumed {name} must be > 0, got {value}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def cost_totals(stages: list[dict[str, Any]], rows: list[dict[str, Any]], throughput: Throughput,
                experiments: list[str]) -> dict[str, Any]:  # fmt: skip
    """TFLOP and GPU hours of a dry run's stages (training) and rows (beam and exact ranking), in total and
    per experiment (a stage shared by several experiments counts in the first that needs it)."""

    def part(ss: list[dict[str, Any]], rr: list[dict[str, Any]]) -> dict[str, float]:
        train = sum(s["tflop"] for s in ss)
        beam = sum(r["beam_tflop"] for r in rr)
        exact = sum(r.get("exact_tflop", 0.0) for r in rr)
        return {"train_tflop": train, "beam_tflop": beam, "exact_tflop": exact,
                "train_gpu_hours": train / throughput.train_tflops / 3600,
                "beam_gpu_hours": beam / throughput.eval_tflops / 3600,
                "exact_gpu_hours": exact / throughput.eval_tflops / 3600}  # fmt: skip

    by = {e: part([s for s in stages if s["experiment"] == e], [r for r in rows if r["experiment"] == e])
          for e in experiments}  # fmt: skip
    return {**part(stages, rows), "by_experiment": by}
