"""The decoder on the packed path: a transformers ``*ForCausalLM`` (Llama, Qwen2, Qwen3, Mistral, Gemma;
``patchrec.model.backbone``) that reads ``PackedBatch`` es.

Input rows come from ``patch_embed`` over the model's own input-embedding table (text tokens, item patches and
session patches alike), times the model's embedding scale where it has one (Gemma: sqrt(hidden), applied by
its embedding module to every token, so a patch is the mean of the tokens' embeddings exactly as the model
embeds them). Every layer is the model's own module; only attention is patchrec's registered function, told
by an ``AttentionPlan`` (``patchrec.model.attention``) which keys each row sees: varlen over the batch's
``cu_seqlens``, PerSRec's blocks, a cached prompt. RoPE reads the packed ``position_ids``. Logits come from
the model's own output head (with its final-logit soft-capping, Gemma) on the answer rows only: never for
history or prompt rows.

``PackedDecoder.decode`` is the one decoder call every path uses: training (``forward``), exact ranking and
beam search (``patchrec.eval``), PerSRec's prompt and state encoding (``patchrec.persrec.llm``). A Hugging
Face checkpoint directory (``config.json`` + safetensors) loads and saves unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from patchrec.batching.packed import FoldPass, PackedBatch
from patchrec.model.attention import PACKED_ATTENTION, AttentionPlan, BlockPlan, PackedPlan
from patchrec.model.backbone import check_architecture, load_causal_lm
from patchrec_kernels.patch_embed import patch_embed


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


class _NoInputGradRow(torch.autograd.Function):
    """Identity on the table whose backward zeroes one row: ``nn.Embedding(padding_idx=p)`` never sends
    gradient to row p (Gemma's pad, SmolLM2's pad = <|im_end|>), so patches over the table do not either."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, row: int) -> torch.Tensor:
        ctx.row = row
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_fill(0, torch.tensor([ctx.row], device=grad.device), 0.0), None


class _SparseTableRows(torch.autograd.Function):
    """``weight.index_select(0, ids)`` (``ids`` distinct) whose backward gives the table a sparse COO gradient
    over those rows, the ``skip`` row (a padding row, -1 for none) zeroed as ``_NoInputGradRow`` does.

    Used for a table tied to the output head in CPU training (``PackedDecoder.embed``): the head's dense
    [V, D] gradient already holds every row, so the autograd engine adds these rows into it instead of first
    writing a dense zero [V, D] gradient for the patches and then a dense sum (two fresh V x D buffers per
    step, page faults on CPU). The sums are the same numbers in the same order: bitwise the dense gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, skip: int) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape, ctx.skip = weight.shape, skip
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        if ctx.skip >= 0:
            grad = grad.masked_fill((ids == ctx.skip)[:, None], 0.0)
        sparse = torch.sparse_coo_tensor(ids[None], grad, ctx.shape, is_coalesced=True,
                                         check_invariants=False)  # fmt: skip
        return sparse, None, None


@dataclass
class PackedOutput:
    loss: torch.Tensor  # scalar: mean cross-entropy over all answer tokens of the batch
    label_loss: torch.Tensor  # [N] fp32 cross-entropy of each answer token
    sample_loss: torch.Tensor  # [Q] fp32 mean cross-entropy of each sequence's answer tokens
    answer_hidden: torch.Tensor  # [N, D] final hidden states at the label rows


class PackedDecoder(nn.Module):
    """A supported family's ``*ForCausalLM`` that reads ``PackedBatch`` es (see the module docstring)."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        check_architecture(lm.config, type(lm).__name__)
        lm.set_attn_implementation(PACKED_ATTENTION)
        self.lm = lm
        # Rows of the table as the checkpoint had them (rows past it were added: markers, PerSRec tokens).
        self.base_vocab_size = lm.get_input_embeddings().num_embeddings
        # LoRA adapters when ``patchrec.model.lora.apply_lora`` added them (it owns their saving).
        self.adapter = None

    @classmethod
    def from_preset(cls, preset: str | ModelPreset, vocab_size: int, *, seed: int = 0, **overrides):
        """A random-weight Llama with a preset's shapes (deterministic for a seed)."""
        config = llama_config(preset, vocab_size, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = LlamaForCausalLM(config)
        return cls(lm)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vocab_size: int | None = None, dtype=None) -> PackedDecoder:
        """Load a Hugging Face directory or a ``.gguf`` file of a supported family
        (``patchrec.model.backbone``); grow the embedding table to ``vocab_size`` (the tokenizer's length
        once the history markers are added) when it is larger. ``dtype`` None keeps the checkpoint's dtype
        (fp32 for GGUF)."""
        lm = load_causal_lm(path, dtype=dtype, attn_implementation=PACKED_ATTENTION)
        base_vocab_size = lm.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > base_vocab_size:
            # New marker rows start at the mean of the existing rows (transformers' default), so the
            # markers begin as an "average token" rather than random noise.
            lm.resize_token_embeddings(vocab_size)
        model = cls(lm)
        model.base_vocab_size = base_vocab_size
        return model

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` + safetensors, loadable by ``from_pretrained`` and by transformers; ``dtype``
        writes a cast copy (config included) and leaves the model's own weights as they are. A model with
        LoRA adapters writes an adapter directory instead (``patchrec.model.lora``)."""
        if self.adapter is not None:
            self.adapter.save(self, path, dtype)
            return
        lm = self.lm
        if dtype is not None and any(p.dtype != dtype for p in lm.parameters()):
            lm = copy.deepcopy(lm).to(dtype)
        lm.save_pretrained(Path(path))

    @property
    def config(self) -> PretrainedConfig:
        return self.lm.config

    def no_weight_decay(self) -> set[str]:
        """Names of parameters an optimizer must not decay (the table whose rows LoRA ``new`` masks)."""
        return set() if self.adapter is None else self.adapter.no_weight_decay(self)

    @property
    def vocab_size(self) -> int:
        """Rows of the output head (the vocabulary the log-probabilities run over)."""
        return self.lm.get_output_embeddings().weight.shape[0]

    # ---- input rows ----------------------------------------------------------------------------------------
    def embedding_table(self) -> torch.Tensor:
        """[V, D] the input-embedding table patches average over (before the model's embedding scale)."""
        return self.lm.get_input_embeddings().weight

    def scale_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the table -> what the model feeds its first layer: Gemma's embedding module multiplies
        every token's row by ``embed_scale`` (sqrt(hidden), in the table's dtype); a mean of rows is scaled
        the same way because the scale is linear. Other families: unchanged."""
        scale = getattr(self.lm.get_input_embeddings(), "embed_scale", None)
        return rows if scale is None else rows * scale.to(rows.dtype)

    def sparse_table_grad(self) -> bool:
        """Whether a training forward hands the table a sparse gradient (``_SparseTableRows``): only where
        the dense one costs (CPU) and is exact (the table is tied to the output head, which gives it a dense
        gradient in the same backward), in eager mode (``torch.unique``'s size depends on the data)."""
        table = self.embedding_table()
        return (table.requires_grad and torch.is_grad_enabled() and table.device.type == "cpu"
                and self.lm.get_output_embeddings().weight is table
                and not torch.compiler.is_compiling())  # fmt: skip

    def embed(
        self, batch: PackedBatch, *, validate: bool | None = None, head_follows: bool = False
    ) -> torch.Tensor:
        """[R, D] input rows of the batch; a PerSRec rolling batch gets its memory rows written (the
        memory it carries, or the one its fold passes compute: ``fold_memory``). ``head_follows``: the
        caller applies the (tied) output head in the same graph (``forward``), so the table's gradient may
        come sparse (``sparse_table_grad``)."""
        table = self.embedding_table()
        pad = getattr(self.lm.get_input_embeddings(), "padding_idx", None)
        token_ids = batch.token_ids
        if head_follows and self.sparse_table_grad():
            ids, token_ids = torch.unique(batch.token_ids, return_inverse=True)
            table = _SparseTableRows.apply(table, ids, -1 if pad is None else int(pad))
        elif pad is not None and table.requires_grad and torch.is_grad_enabled():
            table = _NoInputGradRow.apply(table, pad)
        rows = patch_embed(table, token_ids, batch.seg_offsets, batch.row_offsets, validate=validate)
        rows = self.scale_embeddings(rows)
        if batch.memory_rows is None:
            return rows
        memory = batch.memory if batch.memory is not None else self.fold_memory(batch)
        return rows.index_copy(0, batch.memory_rows, memory.reshape(-1, rows.shape[-1]).to(rows.dtype))

    def initial_memory(self, memory_ids: torch.Tensor, num: int) -> torch.Tensor:
        """[num, k, D] PerSRec rolling memory before any segment is folded: the T tokens' embeddings."""
        return self.embed_tokens(memory_ids).unsqueeze(0).expand(num, -1, -1)

    def fold_memory(self, batch: PackedBatch, memory: torch.Tensor | None = None) -> torch.Tensor:
        """[Q, k, D] memory of every sequence of a rolling batch after its fold passes, starting from
        ``memory`` (default: the initial memory); the memory is detached after pass j when
        ``(j + 1) % batch.fold_unroll == 0``."""
        if memory is None:
            memory = self.initial_memory(batch.memory_ids, batch.num_sequences)
        for j, fold in enumerate(batch.folds or []):
            detach = bool(batch.fold_unroll) and (j + 1) % batch.fold_unroll == 0
            memory = self.fold_pass(fold, memory, detach=detach)
        return memory

    def fold_pass(self, fold: FoldPass, memory: torch.Tensor, *, detach: bool = False) -> torch.Tensor:
        """One fold pass: its sequences read their owner's memory (``memory`` [Q, k, D]) in their first k
        rows; the final hidden states of their last k rows (the T rows) become the owners' new memory."""
        rows = self.embed(fold.batch)
        carried = memory.index_select(0, fold.owner).reshape(-1, rows.shape[-1])
        rows = rows.index_copy(0, fold.memory_rows, carried.to(rows.dtype))
        hidden = self.decode(rows, fold.batch.position_ids, self.batch_plan(fold.batch))
        new = hidden.index_select(0, fold.write_rows).reshape(len(fold.owner), -1, hidden.shape[-1])
        if detach:
            new = new.detach()
        return memory.index_copy(0, fold.owner, new.to(memory.dtype))

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T, D] input rows of single tokens, exactly as the model's embedding module gives them."""
        return self.lm.get_input_embeddings()(token_ids)

    # ---- the decoder call ----------------------------------------------------------------------------------
    def decode(self, inputs: torch.Tensor, position_ids: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Final (normed) hidden states [R, D] of input rows [R, D] at RoPE positions [R], every layer's
        attention done by ``plan`` (which may record the layers' keys/values)."""
        if getattr(self.config, "sliding_window", None) is not None:
            # The attention hook refuses a sliding-window layer when a row lies beyond its window.
            plan.max_position = int(position_ids.max()) if position_ids.numel() else 0
        out = self.lm.model(inputs_embeds=inputs.unsqueeze(0), position_ids=position_ids.unsqueeze(0),
                            attention_plan=plan, use_cache=False)  # fmt: skip
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V] logits of hidden rows [N, D]: the model's output head and, where the family has it, its
        final-logit soft-capping (as ``*ForCausalLM.forward`` applies them)."""
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 [N, V] next-token log-probabilities at hidden rows (small N only)."""
        return torch.log_softmax(self.logits(hidden).float(), dim=-1)

    # ---- training ------------------------------------------------------------------------------------------
    def batch_plan(self, batch: PackedBatch) -> AttentionPlan:
        """Causal within each sequence, or PerSRec's blocks when the batch has a layout."""
        if batch.layout is not None:
            return BlockPlan.of_layout(batch.layout)
        return PackedPlan(batch.cu_seqlens, batch.max_seqlen)

    def hidden_states(self, batch: PackedBatch, *, validate: bool | None = None,
                      head_follows: bool = False) -> torch.Tensor:  # fmt: skip
        """[R, D] final (normed) hidden states of every row (PerSRec's block attention when the batch has a
        layout; RoPE positions stay the row index inside the sequence); ``head_follows``: see ``embed``."""
        rows = self.embed(batch, validate=validate, head_follows=head_follows)
        return self.decode(rows, batch.position_ids, self.batch_plan(batch))

    def forward(self, batch: PackedBatch, *, validate: bool | None = None) -> PackedOutput:
        hidden = self.hidden_states(batch, validate=validate, head_follows=True)
        answer_hidden = hidden.index_select(0, batch.label_rows)
        # The output head over the whole vocabulary runs on the N answer rows only.
        logits = self.logits(answer_hidden).float()
        label_loss = F.cross_entropy(logits, batch.label_ids, reduction="none")
        q = batch.num_sequences
        sums = torch.zeros(q, dtype=torch.float32, device=hidden.device).index_add_(
            0, batch.label_sample, label_loss
        )
        # index_add, not bincount: bincount's output size depends on the data, which breaks a compiled graph
        ones = torch.ones_like(label_loss)
        counts = torch.zeros_like(sums).index_add_(0, batch.label_sample, ones).clamp_min(1)
        return PackedOutput(label_loss.mean(), label_loss, sums / counts, answer_hidden)


# The name every Llama-era call site uses; the class runs every supported family.
PackedLlama = PackedDecoder

__all__ = ["PRESETS", "ModelPreset", "PackedDecoder", "PackedLlama", "PackedOutput", "llama_config"]
