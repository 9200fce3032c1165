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
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from patchrec.batching.pack import PackedBatch, iter_batches
from patchrec.batching.plan import Planner, evaluation_plan, make_planner
from patchrec.batching.tokens import HISTORY_MARKERS, TokenizedDataset, load_tokenizer, tokenize_dataset
from patchrec.data.dataset import Dataset, Samples, make_samples
from patchrec.data.source import load_data
from patchrec.data.synthetic import SyntheticConfig
from patchrec.model.backbone import has_tokenizer, is_gguf
from patchrec.model.decoder import PRESETS as MODEL_PRESETS
from patchrec.model.decoder import PackedDecoder
from patchrec.model.lora import (
    DEFAULT_TARGETS,
    LoraSettings,
    apply_lora,
    is_adapter_dir,
    load_model,
    merge_lora,
)
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


# ---- set-up ------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_dataset(config: TrainConfig) -> Dataset:
    """The run's dataset: a release directory, or ``"synthetic"`` shaped by the ``synthetic_*`` fields."""
    synthetic = SyntheticConfig(
        num_users=config.synthetic_users, num_items=config.synthetic_items,
        mean_length=config.synthetic_length, num_topics=config.synthetic_topics,
        interests=config.synthetic_interests, long_term_share=config.synthetic_long_term_share,
        seed=config.synthetic_seed,
    )  # fmt: skip
    return load_data(config.data, synthetic)


def resolve_model_dir(init: str) -> Path | None:
    """``init`` -> model directory or ``.gguf`` file, or None for a model preset (random init).

    Accepts a ``.gguf`` file, a model / checkpoint directory (``config.json``) or a run directory (its
    ``model/``, else its newest checkpoint), so a stage can start from the previous stage's ``--out``."""
    if init in MODEL_PRESETS:
        return None
    path = Path(init)
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"init {init!r}: no such GGUF file")
        return path
    if (path / "config.json").is_file() or is_adapter_dir(path):
        return path
    if (path / "model" / "config.json").is_file() or is_adapter_dir(path / "model"):
        return path / "model"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(
        f"init {init!r} is neither a model preset {sorted(MODEL_PRESETS)}, a .gguf file, nor a directory "
        "with config.json, model/config.json or checkpoints/"
    )


def resolve_tokenizer(config: TrainConfig, dataset: Dataset, model_dir: Path | None, out: Path) -> Path:
    """The tokenizer: ``config.tokenizer``, else the init model's, else (random init only) a BPE trained on
    the catalog titles and saved in ``out/tokenizer``."""
    if config.tokenizer is not None:
        path = Path(config.tokenizer)
        if not (path.is_dir() or (is_gguf(path) and path.is_file())):
            raise FileNotFoundError(f"tokenizer {path}: no such directory or .gguf file")
        return path
    if model_dir is not None:
        if has_tokenizer(model_dir):
            return model_dir
        raise ValueError(f"init {model_dir} has no tokenizer files: pass --tokenizer")
    trained = out / "tokenizer"
    if not has_tokenizer(trained):
        from patchrec.batching.tokenizer_train import train_title_tokenizer

        prompt = [dataset.system_prompt, dataset.user_prompt]
        # Written aside, then renamed: a run killed mid-write leaves no half tokenizer to resume with.
        tmp = out / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_title_tokenizer(dataset.titles, tmp, config.tokenizer_vocab, extra_texts=prompt)
        shutil.rmtree(trained, ignore_errors=True)  # a directory without tokenizer files (nothing to keep)
        os.replace(tmp, trained)
    return trained


def random_subset(samples: Samples, size: int, seed: int) -> Samples:
    if size <= 0 or size >= len(samples):
        return samples
    index = np.sort(np.random.default_rng(seed).choice(len(samples), size, replace=False))
    return samples.select(index)


def epoch_seed(seed: int, epoch: int) -> int:
    # Different order and random plans every epoch, each a pure function of (seed, epoch).
    return seed + 7919 * epoch


# ---- validation --------------------------------------------------------------------------------------------
def validate(
    model: PackedDecoder, tokens: TokenizedDataset, samples: Samples, planner: Planner, *,
    ctx: DistContext | None = None, mode: str | None = None, device: torch.device | None = None,
) -> dict | None:  # fmt: skip
    """HR/NDCG@10/20 on ``samples`` with exact ranking; None when ``patchrec.eval.evaluate`` is not installed.

    Under torchrun every rank ranks a shard (a collective: all ranks call it); FSDP first gathers a full
    copy of the weights on every rank (evaluation runs a different number of forwards on each rank, which
    per-layer all-gathers would not survive)."""
    try:
        import patchrec.eval.evaluate  # noqa: F401
    except ImportError:
        return None
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


def persrec_options(config: TrainConfig) -> dict[str, Any]:
    """The persrec plan's options of a config (``make_planner`` keywords)."""
    return {"segment": config.persrec_segment, "tokens": config.persrec_tokens, "old": config.persrec_old,
            "layout": config.persrec_layout, "window": config.persrec_window, "recent": config.persrec_recent,
            "unroll": config.persrec_unroll}


def history_items(config: TrainConfig, dataset) -> int:
    """Items of history a sample reads: ``max_items``, or the whole timeline for PerSRec's rolling layout
    (its segments are fixed from each user's first interaction)."""
    if config.stage == "persrec" and config.persrec_layout == "rolling":
        return max(int(np.diff(dataset.user_offsets).max(initial=1)), 1)
    return config.max_items


def persrec_token_count(config: TrainConfig) -> int:
    """PerSRec tokens the tokenisation needs: only the persrec stage adds them to the vocabulary."""
    return config.persrec_tokens if config.stage == "persrec" else 0


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


def lora_settings(config: TrainConfig) -> LoraSettings:
    """The LoRA settings of a config with ``lora_r`` > 0 (defaults: alpha 2 r, every projection, new rows)."""
    return LoraSettings(
        r=config.lora_r, alpha=config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_r,
        targets=tuple(config.lora_targets or DEFAULT_TARGETS),
        train_embeddings=config.train_embeddings or "new",
    )  # fmt: skip


def _load_model(config: TrainConfig, init_dir: Path | None, checkpoint: Path | None, vocab_size: int,
                new_rows: list[int]) -> PackedDecoder:  # fmt: skip
    """fp32 master weights whatever the checkpoint's dtype (a bf16 checkpoint trained in bf16 would round
    away most updates at fine-tuning learning rates). A checkpoint of a LoRA run is an adapter directory
    (base, adapter, embedding rows); a new LoRA run puts adapters on the init model (merged, if it is itself
    an adapter directory) and records where that base comes from."""
    if checkpoint is not None:
        return load_model(checkpoint, vocab_size=vocab_size, dtype=torch.float32)
    if init_dir is not None:
        model = load_model(init_dir, vocab_size=vocab_size, dtype=torch.float32, merge=True)
        base = {"path": str(Path(init_dir).resolve())}
    else:
        model = PackedDecoder.from_preset(config.init, vocab_size, seed=config.seed).float()
        base = {"preset": config.init, "seed": config.seed}
    if config.lora_r:
        apply_lora(model, lora_settings(config), base=base, new_rows=new_rows)
    return model


def added_token_ids(tokenizer, tokens: TokenizedDataset) -> list[int]:
    """The ids of the tokens patchrec adds: the history markers and the PerSRec tokens (LoRA's ``new``)."""
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(HISTORY_MARKERS))] + [
        int(i) for i in tokens.persrec_ids
    ]


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


def _train(config: TrainConfig, resume: bool, ctx: DistContext, device: torch.device) -> TrainResult:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.dtype == "bf16" and device.type != "cuda":
        raise ValueError("dtype bf16 autocast is CUDA-only here; use dtype auto or fp32 on CPU")
    # bf16 autocast with fp32 master weights on CUDA (the released runs train in bf16); CPU stays fp32.
    use_bf16 = device.type == "cuda" and config.dtype in ("auto", "bf16")
    mode = resolve_mode(config.parallel, ctx)
    main = ctx.is_main

    checkpoint = latest_checkpoint(out) if resume else None
    if resume:
        _check_resume_config(out, config)
        if checkpoint is None and main:
            print(f"patchrec train: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    ctx.barrier()  # every rank has read the run directory before rank 0 writes to it
    set_seed(config.seed)
    dataset = load_dataset(config)
    init_dir = resolve_model_dir(config.init)
    if main:  # rank 0 trains the title BPE (when one is needed); the others then load it
        tok_dir = resolve_tokenizer(config, dataset, init_dir, out)
    ctx.barrier()
    if not main:
        tok_dir = resolve_tokenizer(config, dataset, init_dir, out)
    tokenizer = load_tokenizer(tok_dir)
    tokens = tokenize_dataset(tokenizer, dataset, persrec_tokens=persrec_token_count(config))
    if checkpoint is None and main:
        (out / "log.jsonl").unlink(missing_ok=True)
        config.replace(tokenizer=str(tok_dir)).to_json(out / "train_config.json")

    train_all = make_samples(dataset, "train", history_items(config, dataset))
    train_samples = random_subset(train_all, config.train_samples, config.seed)
    if len(train_samples) == 0:
        raise ValueError(f"data {config.data!r} has no training samples")
    planner = make_planner(config.stage, k=config.k, g=config.g, p=config.p, **persrec_options(config))
    model = _load_model(config, init_dir, checkpoint, tokens.vocab_size, added_token_ids(tokenizer, tokens))
    model.to(device).train()
    # FSDP computes in bf16 through its MixedPrecisionPolicy, the other modes through autocast.
    model = wrap(model, mode, ctx, device, bf16=use_bf16)
    autocast = use_bf16 and mode != "fsdp"
    total_steps = total_steps_of(config, len(train_samples))

    groups, param_names = param_groups(unwrap(model), config.weight_decay)
    optimizer = make_adamw(groups, lr=config.lr, impl=config.adamw)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps),
                                                total_steps)
    position = {"step": 0}
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        load_optimizer_state(model, optimizer, state["optimizer"], mode, param_names)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"])
        position = {"step": int(state["position"]["step"])}
        if main:
            _trim_log(out / "log.jsonl", position["step"])

    val_samples = None
    if config.val_every > 0:
        val_all = make_samples(dataset, "val", history_items(config, dataset))
        val_samples = random_subset(val_all, config.val_samples, config.seed + 1) if len(val_all) else None

    result = TrainResult(out, None, position["step"], total_steps, rank=ctx.rank, world_size=ctx.world_size)
    log_path = out / "log.jsonl"
    info = {"world_size": ctx.world_size, "parallel": mode or "none"}

    def save_step() -> None:
        # FSDP gathers on every rank (collectives); rank 0 writes; the others wait until it is on disk.
        plain = gather_full_model(model, mode, device, all_ranks=False)
        optimizer_state = full_optimizer_state(model, optimizer, mode, param_names)
        if main:
            save_checkpoint(out, plain, tokenizer, optimizer_state, scheduler, position,
                            config.keep_checkpoints, info)  # fmt: skip
        ctx.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=position["step"], desc=f"train {config.stage}",
               disable=not (config.progress and main), dynamic_ncols=True)
    scale = loss_scale(mode, ctx)
    rows_done = tokens_done = seqs_done = samples_done = 0
    train_seconds = 0.0
    halted = False
    while position["step"] < total_steps:
        step_start = time.perf_counter()  # packing included: it is part of the training cost
        work = step_work(config, train_samples, planner, tokens, position["step"], total_steps, ctx, mode)
        # Weight every answer token of the step equally: sum over micro-batches (and ranks) / all answer
        # tokens of the step, so accumulation gives the gradient of one batch of all of them.
        loss_sum = 0.0
        last = len(work.batches) - 1
        for i, (batch, weight) in enumerate(zip(work.batches, work.weights, strict=True)):
            batch = batch.to(device)
            with accumulating(model, mode, sync=i == last):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out_b = model(batch)
                loss = out_b.label_loss.sum() / work.num_labels
                # DDP / FSDP average gradients over ranks: scale by the world size to sum them; a filler
                # (weight 0) only takes part in the collectives.
                factor = scale * weight
                (loss if factor == 1.0 else loss * factor).backward()
            loss_sum += float(loss.detach()) * weight
        if mode is not None:
            loss_sum = ctx.all_reduce_sum([loss_sum])[0]
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(model, clip)
        lr = scheduler.get_last_lr()[0]
        kill_point("step")  # a no-op outside tests (see patchrec.train.checkpoint.KILL_ENV)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position["step"] += 1
        step = position["step"]
        result.step_losses[step] = loss_sum

        rows, toks, seqs = work.rows, work.tokens, work.sequences
        step_samples_n = seqs // planner.views
        rows_done, tokens_done, seqs_done = rows_done + rows, tokens_done + toks, seqs_done + seqs
        samples_done += step_samples_n
        step_s = max(time.perf_counter() - step_start, 1e-9)
        # Rates count training time only: validation and checkpoint writes are left out.
        train_seconds += step_s
        elapsed = train_seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", rows_s=f"{rows / step_s:.0f}")
        if main and (step % max(config.log_every, 1) == 0 or step == total_steps):
            entry = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                     "samples": step_samples_n, "micro_batches": work.micro_batches, "rows": rows,
                     "sequences": seqs, "rows_per_s": rows_done / elapsed,
                     "tokens_per_s": tokens_done / elapsed, "train_s": elapsed}  # fmt: skip
            if mode is not None:
                entry["rank_rows"] = work.rank_rows
            _log(log_path, entry)
        if val_samples is not None and step % config.val_every == 0:
            metrics = validate(model, tokens, val_samples, val_planner(config), ctx=ctx, mode=mode,
                               device=device)  # fmt: skip
            if metrics is not None:
                entry = {"step": step, "val_plan": val_planner(config).name, **metrics}
                result.val_metrics.append(entry)
                if main:
                    _log(log_path, entry)
                    bar.write(f"step {step} validation: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("@10", "@20"))))
        halted = bool(config.halt_after) and config.halt_after <= step < total_steps
        if (config.save_every and step % config.save_every == 0) or halted:
            save_step()
        if halted:
            break
    bar.close()
    result.seconds = train_seconds
    result.step = position["step"]
    result.samples_trained = samples_done
    if train_seconds > 0:
        result.rows_per_s = rows_done / train_seconds
        result.tokens_per_s = tokens_done / train_seconds
        result.samples_per_s = seqs_done / train_seconds
    if not halted:
        result.model_dir = out / "model"
        plain = gather_full_model(model, mode, device, all_ranks=False)
        if main:
            final = merge_lora(plain) if config.lora_r and config.save == "merged" else plain
            save_model_dir(result.model_dir, final, tokenizer, dtype=SAVE_DTYPES[config.save_dtype])
        ctx.barrier()
    return result
