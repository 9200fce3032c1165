"""What a training stage starts from (``patchrec.train.loop``): the device, the dataset, the init model
(a preset, an HF directory, a ``.gguf`` file, a previous run or checkpoint), the tokenizer, the seeded
subsets, the plan's PerSRec options and the model with its LoRA adapters, if any."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchrec.batching.hf_files import has_tokenizer, is_gguf
from patchrec.batching.tokenizer_train import train_title_tokenizer
from patchrec.batching.tokens import HISTORY_MARKERS, TokenizedDataset
from patchrec.data.dataset import Dataset, Samples
from patchrec.data.source import load_data
from patchrec.data.synthetic import SyntheticConfig
from patchrec.model.decoder import PRESETS as MODEL_PRESETS
from patchrec.model.decoder import PackedDecoder
from patchrec.model.lora import DEFAULT_TARGETS, LoraSettings, apply_lora, is_adapter_dir, load_model
from patchrec.train.checkpoint import latest_checkpoint
from patchrec.train.config import TrainConfig


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
        prompt = [dataset.system_prompt, dataset.user_prompt]
        # Written aside, then renamed: a run killed mid-write leaves no half tokenizer to resume with.
        tmp = out / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_title_tokenizer(dataset.titles, tmp, config.tokenizer_vocab, extra_texts=prompt)
        shutil.rmtree(trained, ignore_errors=True)  # a directory without tokenizer files (nothing to keep)
        os.replace(tmp, trained)
    return trained


def subset_index(num: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of the seeded subset of ``size`` out of ``num`` (all when size <= 0 or >= num)."""
    if size <= 0 or size >= num:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(num, size, replace=False))


def random_subset(samples: Samples, size: int, seed: int) -> Samples:
    """The samples of ``subset_index`` (``samples`` itself when that is all of them)."""
    if size <= 0 or size >= len(samples):
        return samples
    return samples.select(subset_index(len(samples), size, seed))


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


def lora_settings(config: TrainConfig) -> LoraSettings:
    """The LoRA settings of a config with ``lora_r`` > 0 (defaults: alpha 2 r, every projection, new rows)."""
    return LoraSettings(
        r=config.lora_r, alpha=config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_r,
        targets=tuple(config.lora_targets or DEFAULT_TARGETS),
        train_embeddings=config.train_embeddings or "new",
    )  # fmt: skip


def load_stage_model(config: TrainConfig, init_dir: Path | None, checkpoint: Path | None, vocab_size: int,
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


__all__ = ["added_token_ids", "history_items", "load_dataset", "load_stage_model", "lora_settings",
           "persrec_options", "persrec_token_count", "random_subset", "resolve_device", "resolve_model_dir",
           "resolve_tokenizer", "subset_index"]
