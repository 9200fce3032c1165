"""One training stage on the packed path: ``train(TrainConfig) -> TrainResult`` (METHOD.md §3).

Stages are plans (``pretrain``, ``pft-i``, ``pft-s``, ``vanilla``, ``dropout``); each starts from a model
preset (random init), a Hugging Face model directory, a ``.gguf`` file, or a previous stage's output
(``<run>/model``) or checkpoint.

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
    model/                    final model + tokenizer (PackedLlama.from_pretrained, load_tokenizer)

Exact resume. The samples of step ``s`` and their random plans are a pure function of (seed, s), so a
checkpoint stores the step only; with the optimizer, scheduler and RNG states restored, the resumed run
repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from patchrec.backbone import has_tokenizer, is_gguf
from patchrec.data.dataset import Dataset, Samples, make_samples
from patchrec.data.source import load_data
from patchrec.data.synthetic import SyntheticConfig
from patchrec.model import PRESETS as MODEL_PRESETS
from patchrec.model import PackedLlama
from patchrec.pack import PackedBatch, iter_batches
from patchrec.plan import Planner, evaluation_plan, make_planner
from patchrec.tokens import TokenizedDataset, load_tokenizer, tokenize_dataset
from patchrec.train_config import TrainConfig

STATE_FILE = "trainer_state.pt"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Fields that may change between a run and its resumption without changing what is computed.
RESUME_FREE_FIELDS = {"halt_after", "progress", "val_every", "val_samples", "log_every", "save_every",
                      "keep_checkpoints", "device", "out", "tokenizer", "max_rows", "save_dtype"}


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
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
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
        from patchrec.tokenizer_train import train_title_tokenizer

        prompt = [dataset.system_prompt, dataset.user_prompt]
        train_title_tokenizer(dataset.titles, trained, config.tokenizer_vocab, extra_texts=prompt)
    return trained


def random_subset(samples: Samples, size: int, seed: int) -> Samples:
    if size <= 0 or size >= len(samples):
        return samples
    index = np.sort(np.random.default_rng(seed).choice(len(samples), size, replace=False))
    return samples.select(index)


def epoch_seed(seed: int, epoch: int) -> int:
    # Different order and random plans every epoch, each a pure function of (seed, epoch).
    return seed + 7919 * epoch


# ---- checkpoints -------------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (``checkpoints/latest``), or None."""
    pointer = Path(out) / "checkpoints" / "latest"
    if pointer.is_file():
        path = pointer.parent / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` directory to ``final`` (a rename: readers see old or new, never half)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model_dir(
    path: Path, model: PackedLlama, tokenizer, extra: Callable[[Path], None] | None = None,
    dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """Model (its tensors cast to ``dtype`` when given) + tokenizer (and whatever ``extra`` writes into the
    directory), written to a temporary directory first and then renamed to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, dtype=dtype)
    tokenizer.save_pretrained(str(tmp))
    if extra is not None:
        extra(tmp)
    _publish_dir(tmp, path)


def rng_states() -> dict[str, Any]:
    # numpy's state is stored as plain values and a tensor so that the checkpoint loads with
    # torch.load(weights_only=True): no pickled objects are ever unpickled.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    out: Path, model, tokenizer, optimizer, scheduler, position: dict[str, int], keep: int
) -> Path:
    """Write ``checkpoints/step-N`` atomically, point ``checkpoints/latest`` at it, drop old checkpoints.

    Everything goes into a hidden temporary directory first; only a complete directory is renamed into place
    and only then does ``latest`` move, so a crash at any point leaves the previous checkpoint usable."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position['step']:06d}"
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(),
             "position": dict(position)}

    def write_state(tmp: Path) -> None:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps(position) + "\n")

    save_model_dir(root / name, model, tokenizer, extra=write_state)
    _write_atomic_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # Tensors, numbers, strings and containers only (see rng_states): no arbitrary unpickling.
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)


# ---- validation --------------------------------------------------------------------------------------------
def validate(model: PackedLlama, tokens: TokenizedDataset, samples: Samples, planner: Planner) -> dict | None:
    """HR/NDCG@10/20 on ``samples`` with exact ranking; None when ``patchrec.evaluate`` is not installed."""
    try:
        from patchrec.evaluate import evaluate
    except ImportError:
        return None
    model.eval()
    try:
        with torch.no_grad():
            result = evaluate(model, tokens, samples, planner=planner, ranking="exact", ks=(10, 20),
                              progress=False)
    finally:
        model.train()
    return {k: float(v) for k, v in result.metrics.items()}


def val_planner(config: TrainConfig) -> Planner:
    return make_planner(evaluation_plan(config.stage, config.val_plan), k=config.k, g=config.g)


# ---- the loop ----------------------------------------------------------------------------------------------
def _check_resume_config(out: Path, config: TrainConfig) -> None:
    saved_path = out / "train_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    now = config.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE_FIELDS and saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"--resume with a config that differs from {saved_path}: {diff} (saved, now)")


def _log(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    _write_atomic_text(path, "".join(ln + "\n" for ln in lines))


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def total_steps_of(config: TrainConfig, num_samples: int) -> int:
    """Optimizer steps the schedule (and the curriculum) is laid out over."""
    if config.max_steps > 0:
        return config.max_steps
    return config.epochs * steps_per_epoch(num_samples, config.batch_size)


def step_micro_batches(
    config: TrainConfig, samples: Samples, planner: Planner, tokens: TokenizedDataset, step: int, total: int
) -> list[PackedBatch]:
    """The micro-batches of optimizer step ``step`` (0-based): ``batch_size`` samples of the epoch's seeded
    permutation, their random plans seeded by (seed, step) and drawn with curriculum ``p = step / total``."""
    per_epoch = steps_per_epoch(len(samples), config.batch_size)
    epoch, within = divmod(step, per_epoch)
    order = _epoch_order(len(samples), epoch_seed(config.seed, epoch))
    ids = order[within * config.batch_size : (within + 1) * config.batch_size]
    return list(iter_batches(samples, planner, tokens, config.max_rows, order=ids,
                             seed=epoch_seed(config.seed, epoch) * 1_000_003 + within,
                             progress=step / total))  # fmt: skip


@lru_cache(maxsize=2)
def _epoch_order(num_samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_samples)


def _load_model(config: TrainConfig, init_dir: Path | None, checkpoint: Path | None, vocab_size: int):
    """fp32 master weights whatever the checkpoint's dtype (a bf16 checkpoint trained in bf16 would round
    away most updates at fine-tuning learning rates)."""
    if checkpoint is not None or init_dir is not None:
        return PackedLlama.from_pretrained(checkpoint or init_dir, vocab_size=vocab_size, dtype=torch.float32)
    return PackedLlama.from_preset(config.init, vocab_size, seed=config.seed).float()


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run one stage (see the module docstring); ``resume`` resumes from the newest checkpoint of ``out``."""
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.dtype == "bf16" and device.type != "cuda":
        raise ValueError("dtype bf16 autocast is CUDA-only here; use dtype auto or fp32 on CPU")
    # bf16 autocast with fp32 master weights on CUDA (the released runs train in bf16); CPU stays fp32.
    use_bf16 = device.type == "cuda" and config.dtype in ("auto", "bf16")

    checkpoint = latest_checkpoint(out) if resume else None
    if resume:
        _check_resume_config(out, config)
        if checkpoint is None:
            print(f"patchrec train: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    set_seed(config.seed)
    dataset = load_dataset(config)
    init_dir = resolve_model_dir(config.init)
    tok_dir = resolve_tokenizer(config, dataset, init_dir, out)
    tokenizer = load_tokenizer(tok_dir)
    tokens = tokenize_dataset(tokenizer, dataset)
    if checkpoint is None:
        (out / "log.jsonl").unlink(missing_ok=True)
        config.replace(tokenizer=str(tok_dir)).to_json(out / "train_config.json")

    train_samples = random_subset(make_samples(dataset, "train", config.max_items), config.train_samples,
                                  config.seed)
    if len(train_samples) == 0:
        raise ValueError(f"data {config.data!r} has no training samples")
    planner = make_planner(config.stage, k=config.k, g=config.g, p=config.p)
    model = _load_model(config, init_dir, checkpoint, tokens.vocab_size)
    model.to(device).train()
    total_steps = total_steps_of(config, len(train_samples))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: decaying them hurts
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
    )
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps),
                                                total_steps)
    position = {"step": 0}
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"])
        position = {"step": int(state["position"]["step"])}
        _trim_log(out / "log.jsonl", position["step"])

    val_samples = None
    if config.val_every > 0:
        val_all = make_samples(dataset, "val", config.max_items)
        val_samples = random_subset(val_all, config.val_samples, config.seed + 1) if len(val_all) else None

    result = TrainResult(out, None, position["step"], total_steps)
    log_path = out / "log.jsonl"
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=position["step"], desc=f"train {config.stage}",
               disable=not config.progress, dynamic_ncols=True)
    rows_done = tokens_done = seqs_done = samples_done = 0
    train_seconds = 0.0
    halted = False
    while position["step"] < total_steps:
        step_start = time.perf_counter()  # packing included: it is part of the training cost
        micro = step_micro_batches(config, train_samples, planner, tokens, position["step"], total_steps)
        # Weight every answer token of the step equally: sum over micro-batches / all answer tokens of the
        # step, so accumulation gives the gradient of one batch of all of them.
        n_labels = sum(int(b.label_ids.numel()) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out_b = model(batch)
            loss = out_b.label_loss.sum() / n_labels
            loss.backward()
            loss_sum += float(loss.detach())
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position["step"] += 1
        step = position["step"]
        result.step_losses[step] = loss_sum

        rows = sum(b.num_rows for b in micro)
        toks = sum(int(b.token_ids.numel()) for b in micro)
        seqs = sum(b.num_sequences for b in micro)
        step_samples = seqs // planner.views
        rows_done, tokens_done, seqs_done = rows_done + rows, tokens_done + toks, seqs_done + seqs
        samples_done += step_samples
        step_s = max(time.perf_counter() - step_start, 1e-9)
        # Rates count training time only: validation and checkpoint writes are left out.
        train_seconds += step_s
        elapsed = train_seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", rows_s=f"{rows / step_s:.0f}")
        if step % max(config.log_every, 1) == 0 or step == total_steps:
            _log(log_path, {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                            "samples": step_samples, "micro_batches": len(micro), "rows": rows,
                            "sequences": seqs, "rows_per_s": rows_done / elapsed,
                            "tokens_per_s": tokens_done / elapsed, "train_s": elapsed})  # fmt: skip
        if val_samples is not None and step % config.val_every == 0:
            metrics = validate(model, tokens, val_samples, val_planner(config))
            if metrics is not None:
                entry = {"step": step, "val_plan": val_planner(config).name, **metrics}
                result.val_metrics.append(entry)
                _log(log_path, entry)
                bar.write(f"step {step} validation: " + "  ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("@10", "@20"))))
        halted = bool(config.halt_after) and config.halt_after <= step < total_steps
        if (config.save_every and step % config.save_every == 0) or halted:
            save_checkpoint(out, model, tokenizer, optimizer, scheduler, position, config.keep_checkpoints)
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
        save_model_dir(result.model_dir, model, tokenizer, dtype=SAVE_DTYPES[config.save_dtype])
    return result
