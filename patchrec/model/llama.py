"""The Llama decoder on the packed path.

Input rows come from ``patch_embed`` over the model's own input-embedding table (text tokens, item patches and
session patches alike), every attention layer runs ``varlen_attention`` over the batch's ``cu_seqlens``, RoPE
reads the packed ``position_ids``, and the loss reads hidden states at the answer rows only: logits are never
materialised for history or prompt rows.

The layers are transformers' own ``LlamaForCausalLM``, so a Hugging Face Llama checkpoint directory
(``config.json`` + safetensors) loads and saves unchanged; only the attention function is swapped, through
``transformers.AttentionInterface``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from patchrec.batching.pack import PackedBatch
from patchrec.model.backbone import load_causal_lm
from patchrec.persrec.attention import segmented_attention
from patchrec_kernels.patch_embed import patch_embed
from patchrec_kernels.varlen_attention import varlen_attention

PACKED_ATTENTION = "patchrec_varlen"


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention hook: [1, H, R, Dh] packed rows -> varlen attention over ``cu_seq_lens_q``.

    No mask function is registered under this name, so transformers builds no [R, R] mask; sample isolation
    comes from ``cu_seqlens`` alone. A ``persrec_layout`` kwarg (a PerSRec batch's ``BlockLayout``) replaces
    the per-sequence causal rule by PerSRec's blocks (``patchrec.persrec.segmented_attention``).
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or query.shape[0] != 1:
        raise ValueError(
            f"attention {PACKED_ATTENTION!r} needs one packed sequence (batch 1) and cu_seq_lens_q; "
            "call the model through PackedLlama"
        )
    if dropout:
        raise ValueError("attention dropout is not supported on the packed path (Llama uses 0.0)")
    layout = kwargs.get("persrec_layout")
    if layout is not None:
        out = segmented_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), layout, scale=scaling,
            deterministic=True,
        )  # fmt: skip
        return out.unsqueeze(0), None
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens,
        kwargs["max_length_q"],
        causal=True,
        scale=scaling,
        # Training is bitwise reproducible (exact resume), as patch_embed's default backward is: flash-attn's
        # default backward accumulates dq with atomics. It changes nothing without a backward.
        deterministic=True,
        # The packer's offsets are checked once per batch (PackedLlama.forward); re-checking them in every
        # layer would cost a device sync per layer.
        validate=False,
    )
    return out.unsqueeze(0), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)


@dataclass
class ModelPreset:
    """Llama shape; the vocabulary size comes from the tokenizer (markers included)."""

    hidden_size: int  # model width D
    intermediate_size: int  # MLP width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA when smaller than the query heads)
    max_position_embeddings: int  # longest packed sample
    rope_theta: float  # RoPE base
    tie_word_embeddings: bool  # output head shares the input-embedding table
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon


PRESETS: dict[str, ModelPreset] = {
    # CPU-trainable in minutes: ~1-5M parameters depending on the vocabulary.
    "tiny": ModelPreset(128, 352, 2, 4, 2, 4096, 10000.0, True),
    # Llama-3.2-1B(-Instruct) shapes, for random-weight benchmarks (no hub downloads).
    "llama-3.2-1b": ModelPreset(2048, 8192, 16, 32, 8, 131072, 500000.0, True),
}


def llama_config(preset: str | ModelPreset, vocab_size: int, **overrides) -> LlamaConfig:
    """A ``LlamaConfig`` for a named preset (see ``PRESETS``) and a vocabulary size."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    fields = asdict(preset) | overrides
    return LlamaConfig(vocab_size=vocab_size, attention_dropout=0.0, **fields)


@dataclass
class PackedOutput:
    loss: torch.Tensor  # scalar: mean cross-entropy over all answer tokens of the batch
    label_loss: torch.Tensor  # [N] fp32 cross-entropy of each answer token
    sample_loss: torch.Tensor  # [Q] fp32 mean cross-entropy of each sequence's answer tokens
    answer_hidden: torch.Tensor  # [N, D] final hidden states at the label rows


class PackedLlama(nn.Module):
    """A ``LlamaForCausalLM`` that reads ``PackedBatch`` es (see the module docstring)."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        lm.set_attn_implementation(PACKED_ATTENTION)
        self.lm = lm

    @classmethod
    def from_preset(cls, preset: str | ModelPreset, vocab_size: int, *, seed: int = 0, **overrides):
        """Random weights with a preset's shapes (deterministic for a seed)."""
        config = llama_config(preset, vocab_size, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = LlamaForCausalLM(config)
        return cls(lm)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vocab_size: int | None = None, dtype=None) -> PackedLlama:
        """Load a Hugging Face Llama directory or a ``.gguf`` file (``patchrec.model.backbone``); grow the
        embedding table to ``vocab_size`` (the tokenizer's length once the history markers are added) when it
        is larger. ``dtype`` None keeps the checkpoint's dtype (fp32 for GGUF)."""
        lm = load_causal_lm(path, dtype=dtype, attn_implementation=PACKED_ATTENTION)
        if vocab_size is not None and vocab_size > lm.get_input_embeddings().num_embeddings:
            # New marker rows start at the mean of the existing rows (transformers' default), so the
            # markers begin as an "average token" rather than random noise.
            lm.resize_token_embeddings(vocab_size)
        return cls(lm)

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` + safetensors, loadable by ``from_pretrained`` and by transformers; ``dtype``
        writes a cast copy (config included) and leaves the model's own weights as they are."""
        lm = self.lm
        if dtype is not None and any(p.dtype != dtype for p in lm.parameters()):
            lm = copy.deepcopy(lm).to(dtype)
        lm.save_pretrained(Path(path))

    @property
    def config(self) -> LlamaConfig:
        return self.lm.config

    def embed(self, batch: PackedBatch, *, validate: bool | None = None) -> torch.Tensor:
        """[R, D] input rows of the batch."""
        weight = self.lm.get_input_embeddings().weight
        return patch_embed(weight, batch.token_ids, batch.seg_offsets, batch.row_offsets, validate=validate)

    def hidden_states(self, batch: PackedBatch, *, validate: bool | None = None) -> torch.Tensor:
        """[R, D] final (normed) hidden states of every row (PerSRec's block attention when the batch has a
        layout; RoPE positions stay the row index inside the sequence)."""
        inputs = self.embed(batch, validate=validate).unsqueeze(0)
        extra = {} if batch.layout is None else {"persrec_layout": batch.layout}
        out = self.lm.model(
            inputs_embeds=inputs,
            position_ids=batch.position_ids.unsqueeze(0),
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
            use_cache=False,
            **extra,
        )
        return out.last_hidden_state[0]

    def forward(self, batch: PackedBatch, *, validate: bool | None = None) -> PackedOutput:
        hidden = self.hidden_states(batch, validate=validate)
        answer_hidden = hidden.index_select(0, batch.label_rows)
        # The output head over the whole vocabulary runs on the N answer rows only.
        logits = self.lm.lm_head(answer_hidden).float()
        label_loss = F.cross_entropy(logits, batch.label_ids, reduction="none")
        q = batch.num_sequences
        sums = torch.zeros(q, dtype=torch.float32, device=hidden.device).index_add_(
            0, batch.label_sample, label_loss
        )
        counts = torch.bincount(batch.label_sample, minlength=q).clamp_min(1)
        return PackedOutput(label_loss.mean(), label_loss, sums / counts, answer_hidden)
