"""One training stage on the packed path: ``train(TrainConfig) -> TrainResult`` (docs/method.md §3).

Stages are plans (``pretrain``, ``pft-i``, ``pft-s``, ``vanilla``, ``dropout``, ``persrec``); each starts
from a model preset (random init), a Hugging Face model directory, a ``.gguf`` file, or a previous stage's
output (``<run>/model``) or checkpoint.

Batches and precision. Optimizer step ``s`` takes the samples ``s * batch_size ...`` of the epoch's seeded
permutation (``batch_size`` samples for every plan; the last step of an epoch may hold fewer), packs them into
micro-batches of at most ``max_rows`` rows and accumulates their gradients; the loss is the mean over all
answer tokens of the step. The curriculum ``p`` of pre-training / dropout is ``s / total_steps``. Weights and
AdamW state are fp32 whatever the checkpoint's dtype (bf16 autocast on CUDA); the final model is written in
``save_dtype`` (fp32 by default), checkpoints always in fp32.

Output directory::

    train_config.json         the resolved TrainConfig of the run
    log.jsonl                 one line per logged step / validation
    tokenizer/                only when a BPE was trained on the titles
    checkpoints/step-000040/  model (safetensors) + tokenizer + trainer_state.pt + state.json
    checkpoints/latest        name of the newest complete checkpoint
    model/                    final model + tokenizer (PackedDecoder.from_pretrained, load_tokenizer)

LoRA (``lora_r`` > 0, ``patchrec.model.lora``): adapters on the init model, which is otherwise frozen (the
embedding table per ``train_embeddings``); checkpoints are adapter directories (LoRA weights, the embedding
rows that differ from the base, the base's path) with the optimizer state of the trainable parameters only;
``model/`` is merged into plain weights (``save="merged"``) or an adapter directory (``save="adapter"``).

Exact resume. The samples of step ``s`` and their random plans are a pure function of (seed, s), so a
checkpoint stores the step only; with the optimizer, scheduler and RNG states restored, the resumed run
repeats the uninterrupted run's losses.

Several processes (``torchrun``, ``patchrec.train.distributed`` / ``patchrec.train.parallel``). Every rank
plans the whole step, takes a contiguous part of its samples balanced by packed rows and accumulates its own
micro-batches; each rank's loss is divided by the answer tokens of the WHOLE step and gradients are summed
over ranks, so the gradient, the losses and the schedule are those of one process with the same
``batch_size``. Rank 0 writes the logs, checkpoints and the final model; checkpoints hold the full model and
the full optimizer state in the single-process layout, so a run resumes on any world size (and in either
mode).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, set_seed

from patchrec.batching.pack import PackedBatch, iter_batches
from patchrec.batching.plan import Planner, evaluation_plan, make_planner
from patchrec.batching.tokens import TokenizedDataset, load_tokenizer, tokenize_dataset
from patchrec.data.dataset import Samples, make_samples
from patchrec.model.decoder import PackedDecoder
from patchrec.model.lora import merge_lora
from patchrec.train.checkpoint import (  # noqa: F401  (latest_checkpoint, load_trainer_state: part of this API)
    kill_point,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_model_dir,
    set_rng_states,
    write_atomic_text,
)
from patchrec.train.config import TrainConfig
from patchrec.train.distributed import (
    DistContext,
    StepShard,
    distributed,
    evaluate_sharded,
    quiet_unless_main,
    shard_step,
)
from patchrec.train.parallel import (
    accumulating,
    clip_grad_norm,
    full_optimizer_state,
    gather_full_model,
    load_optimizer_state,
    loss_scale,
    make_adamw,
    param_groups,
    resolve_mode,
    unwrap,
    wrap,
)
from patchrec.train.stage_inputs import (
    added_token_ids,
    history_items,
    load_dataset,
    load_stage_model,
    persrec_options,
    persrec_token_count,
    random_subset,
    resolve_device,
    resolve_model_dir,
    resolve_tokenizer,
)

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Fields that may change between a run and its resumption without changing what is computed.
RESUME_FREE_FIELDS = {"halt_after", "progress", "val_every", "val_samples", "log_every", "save_every",
                      "keep_checkpoints", "device", "out", "tokenizer", "max_rows", "save_dtype", "parallel",
                      "dist_timeout", "save"}


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None  # final model (None when the run halted early: resume it to finish)
    step: int  # optimizer steps done in total (including those before a resume)
    total_steps: int  # steps the schedule is laid out over
    step_losses: dict[int, float] = field(default_factory=dict)  # step -> mean answer-token loss (this call)
    val_metrics: list[dict[str, Any]] = field(default_factory=list)  # {"step": ..., "HR@10": ...}
    rows_per_s: float = 0.0  # packed LLM positions per second of training
    tokens_per_s: float = 0.0  # title/prompt tokens gathered per second (rows before patch averaging)
    samples_per_s: float = 0.0  # training sequences (views) per second
    seconds: float = 0.0  # training time of this call (steps incl. packing; no validation or saving)
    samples_trained: int = 0  # training samples of this call's steps (a two-view sample counts once)
    rank: int = 0  # this process's rank (torchrun); only rank 0 writes files
    world_size: int = 1  # processes that trained together

    @property
    def final_loss(self) -> float:
        return self.step_losses[max(self.step_losses)] if self.step_losses else float("nan")


def epoch_seed(seed: int, epoch: int) -> int:
    # Different order and random plans every epoch, each a pure function of (seed, epoch).
    return seed + 7919 * epoch


# ---- validation --------------------------------------------------------------------------------------------
def validate(
    model: PackedDecoder, tokens: TokenizedDataset, samples: Samples, planner: Planner, *,
    ctx: DistContext | None = None, mode: str | None = None, device: torch.device | None = None,
) -> dict[str, float]:  # fmt: skip
    """HR/NDCG@10/20 on ``samples`` with exact ranking.

    Under torchrun every rank ranks a shard (a collective: all ranks call it); FSDP first gathers a full
    copy of the weights on every rank (evaluation runs a different number of forwards on each rank, which
    per-layer all-gathers would not survive)."""
    ctx = ctx or DistContext()
    eval_model = gather_full_model(model, mode, device or torch.device("cpu"), all_ranks=True)
    eval_model.eval()
    try:
        with torch.no_grad():
            result = evaluate_sharded(eval_model, tokens, samples, ctx, planner=planner, ranking="exact",
                                      ks=(10, 20), progress=False)  # fmt: skip
    finally:
        eval_model.train()
    return {k: float(v) for k, v in result.metrics.items()}


def val_planner(config: TrainConfig) -> Planner:
    return make_planner(evaluation_plan(config.stage, config.val_plan), k=config.k, g=config.g,
                        **persrec_options(config))  # fmt: skip


# ---- the loop ----------------------------------------------------------------------------------------------
def _check_resume_config(out: Path, config: TrainConfig) -> None:
    saved_path = out / "train_config.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{saved_path}: malformed JSON ({exc.msg}, line {exc.lineno})") from None
    now = config.to_dict()
    # Fields added after a run was saved hold their defaults there.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {k: saved[k] if k in saved else defaults[k] for k in now}
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE_FIELDS and saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"--resume with a config that differs from {saved_path}: {diff} (saved, now)")


def _log(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from).

    A last line without its newline is a write cut short by a kill: its step's checkpoint was never written
    (a step logs before it saves), so it is past ``step`` and dropped with the others."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or a torn write
    kept = []
    for lineno, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: malformed log line ({exc.msg})") from None
        if entry.get("step", 0) <= step:
            kept.append(line)
    write_atomic_text(path, "".join(ln + "\n" for ln in kept))


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def total_steps_of(config: TrainConfig, num_samples: int) -> int:
    """Optimizer steps the schedule (and the curriculum) is laid out over."""
    if config.max_steps > 0:
        return config.max_steps
    return config.epochs * steps_per_epoch(num_samples, config.batch_size)


def step_samples(config: TrainConfig, num_samples: int, step: int) -> tuple[np.ndarray, int]:
    """Sample indices of optimizer step ``step`` (0-based): ``batch_size`` samples of the epoch's seeded
    permutation, and the seed of their random plans (a function of (seed, step))."""
    per_epoch = steps_per_epoch(num_samples, config.batch_size)
    epoch, within = divmod(step, per_epoch)
    order = _epoch_order(num_samples, epoch_seed(config.seed, epoch))
    ids = order[within * config.batch_size : (within + 1) * config.batch_size]
    return ids, epoch_seed(config.seed, epoch) * 1_000_003 + within


def step_micro_batches(
    config: TrainConfig, samples: Samples, planner: Planner, tokens: TokenizedDataset, step: int, total: int
) -> list[PackedBatch]:
    """The micro-batches of optimizer step ``step`` (0-based): ``step_samples``, their random plans drawn with
    curriculum ``p = step / total``."""
    ids, seed = step_samples(config, len(samples), step)
    return list(iter_batches(samples, planner, tokens, config.max_rows, order=ids, seed=seed,
                             progress=step / total))  # fmt: skip


def step_work(
    config: TrainConfig, samples: Samples, planner: Planner, tokens: TokenizedDataset, step: int, total: int,
    ctx: DistContext, mode: str | None,
) -> StepShard:  # fmt: skip
    """This process's micro-batches of step ``step`` and the whole step's counts: the single-process step, or
    this rank's share of it (``patchrec.train.distributed.shard_step``)."""
    if mode is None:
        micro = step_micro_batches(config, samples, planner, tokens, step, total)
        rows = sum(b.num_rows for b in micro)
        return StepShard(
            batches=micro, weights=[1.0] * len(micro), rows=rows,
            num_labels=sum(int(b.label_ids.numel()) for b in micro),
            tokens=sum(int(b.token_ids.numel()) for b in micro),
            sequences=sum(b.num_sequences for b in micro), micro_batches=len(micro), rank_rows=[rows],
        )  # fmt: skip
    ids, seed = step_samples(config, len(samples), step)
    return shard_step(samples, planner, tokens, ids, seed=seed, progress=step / total,
                      max_rows=config.max_rows, rank=ctx.rank, world_size=ctx.world_size,
                      equal_counts=mode == "fsdp")  # fmt: skip


@lru_cache(maxsize=2)
def _epoch_order(num_samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_samples)


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run one stage (see the module docstring); ``resume`` resumes from the newest checkpoint of ``out``.

    Under torchrun (``WORLD_SIZE`` set) the process group is set up for the run and torn down after it."""
    config.validate()
    device = resolve_device(config.device)
    with distributed(config.dist_timeout, device.type) as ctx:
        if ctx.active and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        quiet_unless_main(ctx)
        return _train(config, resume, ctx, device)


@dataclass
class _Stage:
    """One stage as ``_prepare`` sets it up: what the step loop reads, and its position (updated)."""

    config: TrainConfig
    ctx: DistContext
    device: torch.device
    out: Path
    mode: str | None  # None (one process), "ddp" or "fsdp"
    autocast: bool  # bf16 autocast (CUDA; FSDP computes in bf16 through its own policy instead)
    tokenizer: Any
    tokens: TokenizedDataset
    samples: Samples  # the training samples
    planner: Planner
    model: torch.nn.Module  # wrapped for the mode
    optimizer: torch.optim.Optimizer
    scheduler: Any
    param_names: list[str]
    total_steps: int
    step: int  # optimizer steps done
    val_samples: Samples | None

    @property
    def main(self) -> bool:
        return self.ctx.is_main


@dataclass
class _Rates:
    """What the steps of this call processed, and their training time (validation and saving left out)."""

    rows: int = 0
    tokens: int = 0
    sequences: int = 0
    samples: int = 0
    seconds: float = 0.0


def _prepare(config: TrainConfig, resume: bool, ctx: DistContext, device: torch.device) -> _Stage:
    """Checks, data, tokenizer, model, optimizer and schedule of a run, restored from the newest checkpoint
    when resuming."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.dtype == "bf16" and device.type != "cuda":
        raise ValueError("dtype bf16 autocast is CUDA-only here; use dtype auto or fp32 on CPU")
    # bf16 autocast with fp32 master weights on CUDA (the released runs train in bf16); CPU stays fp32.
    use_bf16 = device.type == "cuda" and config.dtype in ("auto", "bf16")
    mode = resolve_mode(config.parallel, ctx)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume:
        _check_resume_config(out, config)
        if checkpoint is None and ctx.is_main:
            print(f"patchrec train: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    ctx.barrier()  # every rank has read the run directory before rank 0 writes to it
    set_seed(config.seed)
    dataset = load_dataset(config)
    init_dir = resolve_model_dir(config.init)
    if ctx.is_main:  # rank 0 trains the title BPE (when one is needed); the others then load it
        tok_dir = resolve_tokenizer(config, dataset, init_dir, out)
    ctx.barrier()
    if not ctx.is_main:
        tok_dir = resolve_tokenizer(config, dataset, init_dir, out)
    tokenizer = load_tokenizer(tok_dir)
    tokens = tokenize_dataset(tokenizer, dataset, persrec_tokens=persrec_token_count(config))
    if checkpoint is None and ctx.is_main:
        (out / "log.jsonl").unlink(missing_ok=True)
        config.replace(tokenizer=str(tok_dir)).to_json(out / "train_config.json")

    train_all = make_samples(dataset, "train", history_items(config, dataset))
    train_samples = random_subset(train_all, config.train_samples, config.seed)
    if len(train_samples) == 0:
        raise ValueError(f"data {config.data!r} has no training samples")
    planner = make_planner(config.stage, k=config.k, g=config.g, p=config.p, **persrec_options(config))
    model = load_stage_model(config, init_dir, checkpoint, tokens.vocab_size,
                             added_token_ids(tokenizer, tokens))  # fmt: skip
    model.to(device).train()
    # FSDP computes in bf16 through its MixedPrecisionPolicy, the other modes through autocast.
    model = wrap(model, mode, ctx, device, bf16=use_bf16)
    total_steps = total_steps_of(config, len(train_samples))
    groups, param_names = param_groups(unwrap(model), config.weight_decay)
    optimizer = make_adamw(groups, lr=config.lr, impl=config.adamw)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps),
                                                total_steps)
    step = 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        load_optimizer_state(model, optimizer, state["optimizer"], mode, param_names)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"])
        step = int(state["position"]["step"])
        if ctx.is_main:
            _trim_log(out / "log.jsonl", step)
    val_samples = None
    if config.val_every > 0:
        val_all = make_samples(dataset, "val", history_items(config, dataset))
        val_samples = random_subset(val_all, config.val_samples, config.seed + 1) if len(val_all) else None
    return _Stage(config, ctx, device, out, mode, use_bf16 and mode != "fsdp", tokenizer, tokens,
                  train_samples, planner, model, optimizer, scheduler, param_names, total_steps, step,
                  val_samples)  # fmt: skip


def _optimizer_step(run: _Stage, work: StepShard, scale: float) -> tuple[float, float, float]:
    """Forward and backward of this process's micro-batches, then one optimizer step: (the step's loss,
    the gradient norm before clipping, the learning rate it used)."""
    # Weight every answer token of the step equally: sum over micro-batches (and ranks) / all answer tokens
    # of the step, so accumulation gives the gradient of one batch of all of them.
    loss_sum = 0.0
    last = len(work.batches) - 1
    for i, (batch, weight) in enumerate(zip(work.batches, work.weights, strict=True)):
        batch = batch.to(run.device)
        with accumulating(run.model, run.mode, sync=i == last):
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
                out_b = run.model(batch)
            loss = out_b.label_loss.sum() / work.num_labels
            # DDP / FSDP average gradients over ranks: scale by the world size to sum them; a filler
            # (weight 0) only takes part in the collectives.
            factor = scale * weight
            (loss if factor == 1.0 else loss * factor).backward()
        loss_sum += float(loss.detach()) * weight
    if run.mode is not None:
        loss_sum = run.ctx.all_reduce_sum([loss_sum])[0]
    clip = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    grad_norm = clip_grad_norm(run.model, clip)
    lr = run.scheduler.get_last_lr()[0]
    kill_point("step")  # a no-op outside tests (see patchrec.train.checkpoint.KILL_ENV)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_sum, grad_norm, lr


def _save_step(run: _Stage) -> None:
    """A checkpoint of the current step. FSDP gathers on every rank (collectives); rank 0 writes; the
    others wait until it is on disk."""
    plain = gather_full_model(run.model, run.mode, run.device, all_ranks=False)
    optimizer_state = full_optimizer_state(run.model, run.optimizer, run.mode, run.param_names)
    if run.main:
        info = {"world_size": run.ctx.world_size, "parallel": run.mode or "none"}
        save_checkpoint(run.out, plain, run.tokenizer, optimizer_state, run.scheduler, {"step": run.step},
                        run.config.keep_checkpoints, info)  # fmt: skip
    run.ctx.barrier()


def _validate_step(run: _Stage, result: TrainResult, bar) -> None:
    planner = val_planner(run.config)
    metrics = validate(run.model, run.tokens, run.val_samples, planner, ctx=run.ctx, mode=run.mode,
                       device=run.device)  # fmt: skip
    entry = {"step": run.step, "val_plan": planner.name, **metrics}
    result.val_metrics.append(entry)
    if run.main:
        _log(run.out / "log.jsonl", entry)
        bar.write(f"step {run.step} validation: " + "  ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("@10", "@20"))))


def _train(config: TrainConfig, resume: bool, ctx: DistContext, device: torch.device) -> TrainResult:
    run = _prepare(config, resume, ctx, device)
    result = TrainResult(run.out, None, run.step, run.total_steps, rank=ctx.rank, world_size=ctx.world_size)
    bar = tqdm(total=run.total_steps, initial=run.step, desc=f"train {config.stage}",
               disable=not (config.progress and run.main), dynamic_ncols=True)
    scale = loss_scale(run.mode, ctx)
    done = _Rates()
    halted = False
    while run.step < run.total_steps:
        step_start = time.perf_counter()  # packing included: it is part of the training cost
        work = step_work(config, run.samples, run.planner, run.tokens, run.step, run.total_steps, ctx,
                         run.mode)  # fmt: skip
        loss_sum, grad_norm, lr = _optimizer_step(run, work, scale)
        step = run.step
        result.step_losses[step] = loss_sum
        step_samples_n = work.sequences // run.planner.views
        done.rows, done.tokens = done.rows + work.rows, done.tokens + work.tokens
        done.sequences, done.samples = done.sequences + work.sequences, done.samples + step_samples_n
        step_s = max(time.perf_counter() - step_start, 1e-9)
        # Rates count training time only: validation and checkpoint writes are left out.
        done.seconds += step_s
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", rows_s=f"{work.rows / step_s:.0f}")
        if run.main and (step % max(config.log_every, 1) == 0 or step == run.total_steps):
            entry = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                     "samples": step_samples_n, "micro_batches": work.micro_batches, "rows": work.rows,
                     "sequences": work.sequences, "rows_per_s": done.rows / done.seconds,
                     "tokens_per_s": done.tokens / done.seconds, "train_s": done.seconds}  # fmt: skip
            if run.mode is not None:
                entry["rank_rows"] = work.rank_rows
            _log(run.out / "log.jsonl", entry)
        if run.val_samples is not None and step % config.val_every == 0:
            _validate_step(run, result, bar)
        halted = bool(config.halt_after) and config.halt_after <= step < run.total_steps
        if (config.save_every and step % config.save_every == 0) or halted:
            _save_step(run)
        if halted:
            break
    bar.close()
    _finish(run, result, done, halted)
    return result


def _finish(run: _Stage, result: TrainResult, done: _Rates, halted: bool) -> None:
    """The result's totals and rates; the final model (``out/model``) unless the run halted early."""
    result.seconds = done.seconds
    result.step = run.step
    result.samples_trained = done.samples
    if done.seconds > 0:
        result.rows_per_s = done.rows / done.seconds
        result.tokens_per_s = done.tokens / done.seconds
        result.samples_per_s = done.sequences / done.seconds
    if halted:
        return
    result.model_dir = run.out / "model"
    plain = gather_full_model(run.model, run.mode, run.device, all_ranks=False)
    if run.main:
        config = run.config
        final = merge_lora(plain) if config.lora_r and config.save == "merged" else plain
        save_model_dir(result.model_dir, final, run.tokenizer, dtype=SAVE_DTYPES[config.save_dtype])
    run.ctx.barrier()
