"""What the peer benches (``bench_peers_*``) share: the two models, real ML-1M samples, and the peers' ways of
building the same compressed input rows.

Models (``MODELS``): ``tiny`` (the tiny preset's random Llama with the Llama-3 vocabulary: 128,259 rows
tied to the output head; a layer is small, the head large) and ``smollm2`` (SmolLM2-135M-Instruct, the
GGUF file in ../shared dequantised to fp32, its own tokenizer and its tied 49,152-row table). The peers run a
transformers copy of the same weights with ``attn_implementation=HF_ATTENTION`` (``flash_attention_2``
where flash-attn and a GPU are there, else ``sdpa``).

Input rows. patchrec's packed rows come from ``patch_embed``. The transformers peers get the same rows from
the fastest plain-PyTorch form (``F.embedding_bag`` with per-token weights, see ``bench_patch_embed``):
what a capable transformers user would write. The authors' peer builds them as the released trainers do
(``authors.py``).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from machine import DEVICE, DTYPE, HAS_CUDA, SHARED

from patchrec.batching.pack import PackedBatch, pack_batch
from patchrec.batching.plan import make_planner
from patchrec.data.dataset import Samples
from patchrec.model.decoder import PackedDecoder
from patchrec_kernels.patch_embed import token_scale

DATA = SHARED / "data" / "patchrec"
ML1M = DATA / "ml-1m"
LLAMA3 = SHARED / "tokenizers" / "llama3"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("tiny", "smollm2")
PLANS = {"vanilla": dict(name="vanilla"), "pft-i": dict(name="pft-i", k=5), "pft-s": dict(name="pft-s", g=5)}
HF_ATTENTION = "flash_attention_2" if HAS_CUDA and importlib.util.find_spec("flash_attn") else "sdpa"


def available() -> str | None:
    """Why the peer benches cannot run here (None when they can)."""
    missing = [p for p in (ML1M, LLAMA3, SMOLLM2) if not p.exists()]
    if missing:
        return f"{', '.join(map(str, missing))} not available"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is needed to read SmolLM2 (pip install gguf)"
    return None


@dataclass
class Setup:
    name: str  # "tiny" or "smollm2"
    dataset: object
    tokens: object  # TokenizedDataset
    model: PackedDecoder
    hf: torch.nn.Module  # the same weights as a plain transformers *ForCausalLM (HF_ATTENTION)

    def reset_hf(self) -> None:
        """Give the transformers copy patchrec's weights again (a training case steps one of them)."""
        self.hf.load_state_dict(self.model.lm.state_dict())

    def info(self) -> dict:
        config = self.model.config
        return {"model": self.name, "vocab": int(self.model.vocab_size), "hidden": int(config.hidden_size),
                "layers": int(config.num_hidden_layers),
                "params": sum(p.numel() for p in self.model.parameters()),
                "dtype": str(DTYPE).removeprefix("torch."), "hf_attention": HF_ATTENTION}  # fmt: skip


@functools.lru_cache(maxsize=2)
def _dataset(data: str):
    from patchrec.data.release import load_release

    return load_release(DATA / data)


@functools.lru_cache(maxsize=2)
def load(name: str, data: str = "ml-1m") -> Setup:
    """A release (ML-1M by default) tokenised for ``name``'s tokenizer, and the model (seeded: the same
    weights in every run)."""
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset

    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    dataset = _dataset(data)
    torch.manual_seed(0)  # the marker rows SmolLM2 gains are drawn at random
    if name == "tiny":
        tokens = tokenize_dataset(load_tokenizer(LLAMA3), dataset)
        model = PackedDecoder.from_preset("tiny", tokens.vocab_size, seed=0)
    else:
        tokens = tokenize_dataset(load_tokenizer(SMOLLM2), dataset)
        model = PackedDecoder.from_pretrained(SMOLLM2, vocab_size=tokens.vocab_size, dtype=torch.float32)
    model = model.to(DEVICE, DTYPE)
    hf = copy.deepcopy(model.lm)
    hf.set_attn_implementation(HF_ATTENTION)
    return Setup(name, dataset, tokens, model, hf)


def machine_info() -> dict:
    """The machine's state, recorded beside every timing (the CPU is shared: compare within one run)."""
    return {"load_average_1min": os.getloadavg()[0], "cores": os.cpu_count(),
            "threads": torch.get_num_threads()}  # fmt: skip


# ---- samples -----------------------------------------------------------------------------------------------
def train_ids(samples: Samples, length: int, count: int) -> np.ndarray:
    """``count`` training samples (seeded) with at least ``length`` history items."""
    eligible = np.flatnonzero(samples.history_lengths >= length)
    return np.sort(np.random.default_rng(0).choice(eligible, size=count, replace=False))


def long_users(dataset, count: int, min_items: int) -> np.ndarray:
    """The ``count`` first users (by id) with more than ``min_items`` interactions."""
    lengths = np.diff(dataset.user_offsets)
    return np.flatnonzero(lengths > min_items)[:count]


def user_samples(dataset, users: np.ndarray, length: int) -> Samples:
    """One sample per user: target = the user's last item, history = the ``length`` items before it."""
    target = dataset.user_offsets[users + 1].astype(np.int64) - 1
    hist_start = np.maximum(target - length, dataset.user_offsets[users].astype(np.int64))
    return Samples(dataset, "test", length, users.astype(np.int32), hist_start, target)


def plans_of(samples: Samples, ids: np.ndarray, plan: str, length: int):
    return make_planner(**PLANS[plan]).plan_batch(samples.history_lengths[ids], width=length)


def pack(setup: Setup, samples: Samples, ids: np.ndarray, plan: str, length: int, *,
         answer: bool) -> PackedBatch:  # fmt: skip
    plans = plans_of(samples, ids, plan, length)
    return pack_batch(samples, ids, plans, setup.tokens, answer=answer).to(DEVICE)


# ---- the transformers peers' input rows ---------------------------------------------------------------
def bag_rows(weight: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[R, D] the packed input rows in one ``F.embedding_bag`` (the two-level mean as per-token weights)."""
    scale = token_scale(batch.seg_offsets, batch.row_offsets, batch.token_ids.numel()).to(weight.dtype)
    bags = batch.seg_offsets[batch.row_offsets[:-1]]
    return F.embedding_bag(batch.token_ids.long(), weight, bags, mode="sum", per_sample_weights=scale)


def padded(rows: torch.Tensor, batch: PackedBatch, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows right-padded to [Q, width, D] and the [Q, width] attention mask."""
    lengths = batch.cu_seqlens.diff().long()
    seq = torch.repeat_interleave(torch.arange(batch.num_sequences, device=rows.device), lengths)
    out = rows.new_zeros(batch.num_sequences, width, rows.shape[1]).index_put((seq, batch.position_ids), rows)
    mask = (torch.arange(width, device=rows.device)[None] < lengths[:, None]).long()
    return out, mask


def last_rows(batch: PackedBatch) -> torch.Tensor:
    """Row of each sequence's last prompt row (it predicts the first answer token)."""
    return batch.cu_seqlens[1:].long() - 1
