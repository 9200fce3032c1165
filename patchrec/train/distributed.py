"""Data parallelism on ``torch.distributed`` (launched by ``torchrun``): the process group, how a step's
samples and an evaluation's samples are split over ranks, and the collectives the loops need.

Sharding a training step. Every rank plans the WHOLE step exactly as one process would (same samples, same
seeded random plans; planning is cheap: no tokens are gathered), so the plans, the step's answer-token count
and the logged statistics need no communication. The step's samples are then cut into ``world_size``
contiguous parts balanced by packed rows (the cost of a sample: a PFT-S sample is a fraction of a vanilla
one), and each rank packs its part into its own ``max_rows`` micro-batches. A rank that has fewer
micro-batches than collectives require runs zero-weighted copies of the step's smallest sample, so every rank
takes part in every collective.

Sharding an evaluation. Whole-catalog ranking costs about the same for every sample (the catalog dominates),
so evaluation shards are contiguous ranges of equal sample counts; the ranks are gathered in sample order.

The model wrappers and the world-size independent checkpoint state live in ``patchrec.train.parallel``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from patchrec.batching.pack import PackedBatch, Packer, batch_slots
from patchrec.batching.plan import Planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Samples
from patchrec.eval.evaluate import EvalResult, evaluate, limit_samples
from patchrec.eval.metrics import ranking_metrics


# ---- process group -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; the default is a single process (no process group)."""

    rank: int = 0  # global rank
    world_size: int = 1  # processes in the job
    local_rank: int = 0  # rank on this machine (its GPU index)
    active: bool = False  # a process group is initialised (torchrun, even with one process)
    device: torch.device = torch.device("cpu")  # where collective tensors live (cuda:local_rank for nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks of a few numbers (float64: exact for counts and stable for losses)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the ``WORLD_SIZE`` / ``RANK`` environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextmanager
def distributed(timeout_s: float, device_type: str) -> Iterator[DistContext]:
    """The job's process group for the duration of the block (nccl for CUDA, gloo for CPU), destroyed on exit.

    Without a launcher environment this is a single process and nothing is initialised. ``timeout_s`` bounds
    every collective: a rank that dies or hangs makes the others fail with an error instead of waiting forever
    (torchrun also tears the job down as soon as one worker exits with an error). A group that is already
    initialised (a caller's own) is used as it is and left alone."""
    if dist.is_available() and dist.is_initialized():
        yield _context_of_group(device_type)
        return
    if not launched():
        yield DistContext()
        return
    if timeout_s <= 0:
        raise ValueError(f"dist timeout must be > 0 seconds, got {timeout_s}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
        device_id=torch.device("cuda", local_rank) if cuda else None,
    )  # fmt: skip
    try:
        yield _context_of_group(device_type)
        # Every rank reaches the end before any tears the group down: on a loaded CPU rank 1 once aborted in
        # gloo's teardown ("terminate called without an active exception") while rank 0 was still writing
        # the model. Not on the error path, where a barrier would wait for a rank that is gone.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def quiet_unless_main(ctx: DistContext) -> None:
    """Progress bars and informational logs from rank 0 only: silence transformers' on the other ranks."""
    if ctx.is_main:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _context_of_group(device_type: str) -> DistContext:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, True, device)


# ---- partitions --------------------------------------------------------------------------------------------
def balanced_bounds(costs: np.ndarray, parts: int) -> np.ndarray:
    """int64 ``[parts + 1]`` bounds of a contiguous split of ``costs`` into ``parts`` ranges of near-equal
    sums.

    Bound ``k`` is the position whose prefix sum is nearest to ``k / parts`` of the total (ties: the later),
    so each range's sum is within one item's cost of the ideal share. Ranges may be empty (fewer items than
    parts, or one item worth several shares)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    costs = np.asarray(costs, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(costs)])
    targets = cum[-1] * np.arange(parts + 1) / parts
    right = np.searchsorted(cum, targets, side="left").clip(0, len(cum) - 1)
    left = (right - 1).clip(0, None)
    bounds = np.where(targets - cum[left] < cum[right] - targets, left, right)
    bounds[0], bounds[-1] = 0, len(costs)
    return np.maximum.accumulate(bounds).astype(np.int64)


def even_bounds(count: int, parts: int) -> np.ndarray:
    """int64 ``[parts + 1]`` bounds of ``count`` items in ``parts`` contiguous ranges of equal size (+-1)."""
    return (np.arange(parts + 1, dtype=np.int64) * count) // parts


def greedy_bounds(costs: np.ndarray, budget: int) -> np.ndarray:
    """Bounds of consecutive ranges of ``costs``, each as long as fits in ``budget`` (what ``iter_batches``
    does with a sample's rows and ``max_rows``); every cost must be <= budget."""
    cum = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.int64))])
    bounds = [0]
    while bounds[-1] < len(costs):
        end = int(np.searchsorted(cum, cum[bounds[-1]] + budget, side="right")) - 1
        if end == bounds[-1]:
            raise ValueError(f"cost {int(costs[end])} > budget {budget}")
        bounds.append(end)
    return np.asarray(bounds, dtype=np.int64)


# ---- one training step -------------------------------------------------------------------------------------
@dataclass
class StepShard:
    """This rank's part of one optimizer step, and the whole step's counts (identical on every rank)."""

    batches: list[PackedBatch]  # this rank's micro-batches, zero-weighted fillers last
    weights: list[float]  # 1.0 for real work, 0.0 for a filler (a forward/backward that adds nothing)
    num_labels: int  # answer tokens of the whole step: the loss of every rank is divided by it
    rows: int  # packed rows of the whole step
    tokens: int  # title/prompt tokens gathered for the whole step
    sequences: int  # sequences (views) of the whole step
    micro_batches: int  # micro-batches of the whole step over all ranks (fillers excluded)
    rank_rows: list[int]  # packed rows of each rank's part (the balance)


def shard_step(
    samples: Samples, planner: Planner, tokens: TokenizedDataset, ids: np.ndarray, *, seed: int,
    progress: float, max_rows: int, rank: int, world_size: int, equal_counts: bool,
) -> StepShard:  # fmt: skip
    """Plan the step's samples ``ids`` as ``iter_batches(..., order=ids, seed=seed, progress=progress)`` does,
    split them over ``world_size`` ranks by packed rows, and pack rank ``rank``'s part into micro-batches.

    ``equal_counts``: every rank gets as many micro-batches as the busiest one (FSDP: each forward and
    backward is a collective); otherwise at least one (DDP: one synchronised backward per step)."""
    packer = Packer(tokens)
    # The same planning code and random stream as the single-process step, the whole step as one table.
    slots = next(batch_slots(packer, samples, planner, None, False, seed, np.asarray(ids), progress))
    views = planner.views
    sample_rows = slots.check_fits(views, max_rows, samples)  # what the single-process step's budget counts
    parts = balanced_bounds(sample_rows, world_size)
    micro = [parts[r] + greedy_bounds(sample_rows[parts[r] : parts[r + 1]], max_rows)
             for r in range(world_size)]  # fmt: skip
    counts = [len(m) - 1 for m in micro]
    mine = micro[rank]
    batches = [packer.build(slots.take(lo * views, hi * views))
               for lo, hi in zip(mine[:-1], mine[1:], strict=True)]  # fmt: skip
    weights = [1.0] * len(batches)
    target = max(counts) if equal_counts else 1
    if len(batches) < target:
        small = int(np.argmin(sample_rows))
        filler = packer.build(slots.take(small * views, (small + 1) * views))
        batches += [filler] * (target - len(batches))
        weights += [0.0] * (target - len(weights))
    # Labels of a sequence: its answer title's tokens and the end-of-turn token.
    num_labels = int(packer.title_lengths[slots.target].sum()) + len(slots.target)
    return StepShard(
        batches=batches, weights=weights, num_labels=num_labels, rows=int(slots.rows.sum()),
        tokens=int(slots.ntok.sum()), sequences=len(slots), micro_batches=sum(counts),
        rank_rows=[int(sample_rows[parts[r] : parts[r + 1]].sum()) for r in range(world_size)],
    )  # fmt: skip


# ---- evaluation --------------------------------------------------------------------------------------------
def evaluate_sharded(model, tokens: TokenizedDataset, samples: Samples, ctx: DistContext, *,
                     limit: int | None = None, progress: bool = True, **kwargs) -> EvalResult:  # fmt: skip
    """``patchrec.eval.evaluate.evaluate`` over ``samples`` (the first ``limit``), each rank ranking a
    contiguous shard with its own full copy of ``model``; every rank returns the whole ``EvalResult`` (ranks
    in sample order, metrics over all of them). A single process is ``evaluate`` itself."""
    samples = limit_samples(samples, limit)
    if not ctx.active:
        return evaluate(model, tokens, samples, progress=progress, **kwargs)
    start = time.perf_counter()
    bounds = even_bounds(len(samples), ctx.world_size)
    lo, hi = int(bounds[ctx.rank]), int(bounds[ctx.rank + 1])
    part = None
    if hi > lo:
        part = evaluate(model, tokens, samples.select(slice(lo, hi)), progress=progress and ctx.is_main,
                        **kwargs)  # fmt: skip
    pieces = ctx.all_gather_object(None if part is None else (part.ranks, part.config))
    ranks = np.concatenate([p[0] for p in pieces if p is not None]).astype(np.int64)
    config = dict(next(p[1] for p in pieces if p is not None))
    config["world_size"] = ctx.world_size
    return EvalResult(
        metrics=ranking_metrics(ranks, config["ks"]), ranks=ranks, ranking=config["ranking"],
        mask_history=bool(kwargs.get("mask_history", False)), num_samples=len(ranks),
        seconds=time.perf_counter() - start, config=config,
    )  # fmt: skip


__all__ = ["DistContext", "StepShard", "balanced_bounds", "distributed", "evaluate_sharded", "even_bounds",
           "greedy_bounds", "launched", "quiet_unless_main", "shard_step"]
