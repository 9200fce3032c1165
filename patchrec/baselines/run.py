"""One ID-baseline run end to end, as ``patchrec baseline`` does it: load the data, build the model from its
defaults and the options given, train it (SASRec, HSTU, GRU4Rec; popularity only counts), rank the whole
catalog, and write ``results.json`` (``patchrec.eval.metrics.write_results``), ``config.json`` and the model
(``patchrec.baselines.checkpoint``) into ``out``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from patchrec.baselines.checkpoint import save_baseline
from patchrec.baselines.gru4rec import GRU4Rec, GRU4RecConfig
from patchrec.baselines.hstu import HSTU, HSTUConfig
from patchrec.baselines.latency import per_user_latency
from patchrec.baselines.popularity import Popularity
from patchrec.baselines.sasrec import SASRec, SASRecConfig
from patchrec.baselines.train import TrainConfig, evaluate, fit
from patchrec.data.dataset import Dataset, Samples, make_samples
from patchrec.data.source import load_data
from patchrec.eval.metrics import format_metrics, rank_samples, write_results

MODELS = ("sasrec", "hstu", "gru4rec", "popularity")
# Adam learning rate when no lr is given. GRU4Rec stalled at popularity level with 1e-3 on ML-100K (test
# HR@20 0.065 vs 0.148 with 5e-3, same seed); its paper trained with a large Adagrad rate (0.01).
DEFAULT_LR = {"sasrec": 1e-3, "hstu": 1e-3, "gru4rec": 5e-3}
ATTENTION_MODELS = ("sasrec", "hstu")
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "eval_every", "max_minutes")
MODEL_OPTIONS = ("hidden", "dropout", "num_blocks", "num_heads", "embedding", "num_layers")
PERSREC_OPTIONS = ("persrec_tokens", "persrec_segment", "persrec_cache", "persrec_layout", "persrec_window",
                   "persrec_recent", "persrec_unroll")  # fmt: skip


@dataclass
class BaselineRun:
    """What to run (``patchrec baseline``'s flags). An option left None takes the model's or training's
    default (``SASRecConfig`` / ``HSTUConfig`` / ``GRU4RecConfig``, ``patchrec.baselines.TrainConfig``); one
    that does not apply to the model is a ``ValueError``."""

    model: str  # one of MODELS
    data: str  # release directory or "synthetic"
    out: str  # output directory
    max_items: int | None = None  # history length L (None: 100; PerSRec window: P + R; rolling: every item)
    split: str = "test"  # the split evaluated: "val" or "test"
    mask_history: bool = False  # rank with the user's earlier items masked (also the selection metric's)
    both_masks: bool = False  # also write results_masked.json and results_unmasked.json
    ties: str = "pessimistic"  # how equal scores rank (patchrec.eval.metrics)
    seed: int = 0  # weights, dropout and shuffling
    epochs: int | None = None  # training: max epochs (early stopping)
    batch_size: int | None = None  # training sequences per step
    lr: float | None = None  # Adam learning rate (None: DEFAULT_LR of the model)
    weight_decay: float | None = None  # Adam weight decay
    patience: int | None = None  # evaluations without gain before stopping
    eval_every: int | None = None  # epochs between validations
    max_minutes: float | None = None  # training time budget in minutes
    hidden: int | None = None  # SASRec / HSTU width, GRU units
    dropout: float | None = None
    num_blocks: int | None = None  # SASRec / HSTU attention blocks
    num_heads: int | None = None  # SASRec / HSTU attention heads
    embedding: int | None = None  # GRU4Rec item embedding size
    num_layers: int | None = None  # GRU4Rec GRU layers
    persrec_tokens: int | None = None  # PerSRec (SASRec, HSTU): K tokens per old segment (0 = off)
    persrec_segment: int | None = None  # segments / rolling layouts: items per segment
    persrec_layout: str | None = None  # segments, window or rolling
    persrec_window: int | None = None  # window layout: P old items compressed into the tokens
    persrec_recent: int | None = None  # window layout: R newest items read as they are
    persrec_unroll: int | None = None  # rolling layout: cut the training gradient every U segments
    persrec_cache: str | None = None  # "on" (default): rank from the cached per-user state; "off"
    latency_samples: int = 0  # time per-user inference (batch 1) on this many samples (0 = skip)
    progress: bool = True  # progress bars


def _override(config: Any, run: BaselineRun, names: dict[str, str]) -> Any:
    """``config`` with the fields ``names[field] = option`` replaced where the option was given."""
    given = {f: getattr(run, a) for f, a in names.items() if getattr(run, a) is not None}
    return dataclasses.replace(config, **given)


def _ignored(run: BaselineRun, options: list[str] | tuple[str, ...]) -> None:
    given = [f"--{f.replace('_', '-')}" for f in options if getattr(run, f) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply to {run.model}")


def history_items(run: BaselineRun, dataset: Dataset) -> int:
    """Items of history every sample reads: ``max_items`` (default 100); the PerSRec window layout reads
    P + R, the rolling layout the whole timeline (the longest user's length)."""
    layout = run.persrec_layout or "segments"
    if layout == "window":
        if run.persrec_window is None or run.persrec_recent is None:
            raise ValueError("--persrec-layout window needs --persrec-window P and --persrec-recent R")
        window = run.persrec_window + run.persrec_recent
        if run.max_items not in (None, window):
            raise ValueError(f"--max-items must be P + R = {window} for the window layout, or left out")
        return window
    if run.persrec_window is not None or run.persrec_recent is not None:
        raise ValueError("--persrec-window and --persrec-recent apply to --persrec-layout window")
    if layout != "rolling" and run.persrec_unroll is not None:
        raise ValueError("--persrec-unroll applies to --persrec-layout rolling")
    if layout == "rolling":
        if run.max_items is not None:
            raise ValueError("--persrec-layout rolling reads the whole timeline: leave --max-items out")
        return int(np.diff(dataset.user_offsets).max())
    max_items = 100 if run.max_items is None else run.max_items
    if max_items < 1:
        raise ValueError(f"--max-items must be >= 1, got {max_items}")
    return max_items


def build_model(run: BaselineRun, num_items: int) -> tuple[torch.nn.Module, Any, bool]:
    """(the neural model, its config, whether it ranks from cached PerSRec states) of ``run`` (not
    popularity; ``max_items`` resolved)."""
    if run.model in ATTENTION_MODELS:
        _ignored(run, ["embedding", "num_layers"])
        needs_tokens = [f for f in PERSREC_OPTIONS[1:] if getattr(run, f) is not None]
        if not run.persrec_tokens and needs_tokens:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in needs_tokens)
            raise ValueError(f"{flags} need(s) --persrec-tokens >= 1")
        names = {n: n for n in ["hidden", "dropout", "num_blocks", "num_heads"] + [
            f for f in PERSREC_OPTIONS if f != "persrec_cache"]}  # fmt: skip
        model_class, config_class = (SASRec, SASRecConfig) if run.model == "sasrec" else (HSTU, HSTUConfig)
        model_config = _override(config_class(max_len=run.max_items), run, names)
        cached = bool(model_config.persrec_tokens) and run.persrec_cache != "off"
        return model_class(num_items, model_config), model_config, cached
    _ignored(run, ["num_blocks", "num_heads"])
    model_config = _override(GRU4RecConfig(), run, {n: n for n in ("hidden", "dropout", "embedding",
                                                                   "num_layers")})  # fmt: skip
    return GRU4Rec(num_items, model_config), model_config, False


def _check_options(run: BaselineRun) -> None:
    if run.model not in ATTENTION_MODELS:
        _ignored(run, PERSREC_OPTIONS)
        if run.latency_samples:
            raise ValueError(f"--latency-samples applies to {', '.join(ATTENTION_MODELS)}, not {run.model}")
    if run.latency_samples < 0:
        raise ValueError(f"--latency-samples must be >= 0, got {run.latency_samples}")
    if run.model == "popularity":
        _ignored(run, TRAIN_OPTIONS + MODEL_OPTIONS)


def _train_neural(run: BaselineRun, dataset: Dataset, samples: Samples, config: dict[str, Any],
                  extra: dict[str, Any], log: Callable[[str], None]):  # fmt: skip
    """Build and train the neural model (``config`` and ``extra`` get its settings and training record);
    returns the model and its ranker ``ranks_for(mask_history)``."""
    model, model_config, persrec_cache = build_model(run, dataset.num_items)
    if run.model in ATTENTION_MODELS:
        config["persrec_cache"] = persrec_cache
    train_config = _override(TrainConfig(seed=run.seed, lr=DEFAULT_LR[run.model]), run,
                             {f: f for f in TRAIN_OPTIONS})  # fmt: skip
    config["model_config"] = dataclasses.asdict(model_config)
    config["train_config"] = dataclasses.asdict(train_config)
    result = fit(model, dataset, train_config, max_len=run.max_items, mask_history=run.mask_history,
                 progress=run.progress)  # fmt: skip
    extra["training"] = dataclasses.asdict(result)
    log(f"selected epoch {result.best_epoch} of {result.epochs_run} "
        f"(val NDCG@10 {result.best_val_ndcg10:.4f}, {result.seconds:.0f} s)")

    def ranks_for(mask: bool) -> np.ndarray:
        return evaluate(model, samples, mask_history=mask, ties=run.ties,
                        batch_size=train_config.eval_batch_size, progress=run.progress,
                        persrec_cache=persrec_cache)  # fmt: skip

    if run.latency_samples:
        extra["latency"] = lat = per_user_latency(model, samples, run.latency_samples, cached=persrec_cache)
        state = f", state {lat['state_bytes_mean'] / 1024:.1f} KiB/user" if persrec_cache else ""
        log(f"inference: {lat['ms_per_user_median']:.2f} ms/user (median, batch 1){state}")
    return model, ranks_for


def run_baseline(run: BaselineRun, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and write one baseline (see the module docstring); ``log`` gets the lines
    ``patchrec baseline`` prints. Returns the results written last."""
    out = Path(run.out)
    t0 = time.perf_counter()
    dataset = load_data(run.data)
    run = dataclasses.replace(run, max_items=history_items(run, dataset))
    samples = make_samples(dataset, run.split, run.max_items)
    if len(samples) == 0:
        raise ValueError(f"--split {run.split}: dataset {dataset.name!r} has no samples there")
    set_seed(run.seed)
    config: dict[str, Any] = {
        "model": run.model, "data": run.data, "max_items": run.max_items, "split": run.split,
        "mask_history": run.mask_history,  # also decides the validation metric used for model selection
        "ties": run.ties, "seed": run.seed, "threads": torch.get_num_threads(),
    }  # fmt: skip
    extra: dict[str, Any] = {}
    _check_options(run)
    if run.model == "popularity":
        model = Popularity.fit(dataset)

        def ranks_for(mask: bool) -> np.ndarray:
            return rank_samples(model.scorer(samples), samples, mask_history=mask, ties=run.ties,
                                progress=run.progress, desc=f"eval {run.split}")  # fmt: skip
    else:
        model, ranks_for = _train_neural(run, dataset, samples, config, extra, log)
    config["num_items"] = dataset.num_items
    save_baseline(model, config, out)
    masks = [run.mask_history, not run.mask_history] if run.both_masks else [run.mask_history]
    for mask in masks:
        ranks = ranks_for(mask)
        extra["wall_seconds"] = time.perf_counter() - t0
        common = dict(ranks=ranks, mask_history=mask, split=run.split, dataset=dataset.name, model=run.model,
                      config=config, ties=run.ties, extra=extra)  # fmt: skip
        if mask == run.mask_history:
            written = write_results(out / "results.json", **common)
        if run.both_masks:
            written = write_results(out / f"results_{'masked' if mask else 'unmasked'}.json", **common)
        label = "masked" if mask else "unmasked"
        log(f"{run.model} {dataset.name} {run.split} ({label}, n={len(ranks)}): "
            f"{format_metrics(written['metrics'])}")
    log(f"wrote {out / 'results.json'}")
    return written


__all__ = ["ATTENTION_MODELS", "DEFAULT_LR", "MODELS", "BaselineRun", "build_model", "history_items",
           "run_baseline"]
