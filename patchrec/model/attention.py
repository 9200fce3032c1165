"""Attention plans: what patchrec's registered attention function does in every layer of one decoder call.

The decoder layers are the model's own transformers modules (Llama, Qwen2, Qwen3, Mistral, Gemma): they
compute q/k/v (biases, q/k norms, RoPE) and then call the attention function registered under
``PACKED_ATTENTION`` with the layer's post-RoPE q, k, v. That function hands them to the call's
``AttentionPlan`` (the ``attention_plan`` kwarg of ``PackedDecoder.decode``), which decides which keys every
query row sees and may keep each layer's keys/values (prompt caches, PerSRec states, beam caches):

- ``PackedPlan``: causal attention within each packed sequence (training, prompt encoding);
- ``BlockPlan``: query blocks whose keys are gathered from ``[context rows][this call's rows]`` (the context
  is a per-layer K/V cache handed in), causal on the block's own rows (bottom-right aligned): PerSRec's
  blocks and cached states (``patchrec.persrec.layout.BlockLayout`` has exactly these fields), a beam's own
  cached tokens, or one causal sequence per catalog title;
- ``ContinuationPlan``: rows that continue a cached prompt: attention over the cached prompt keys of their
  sample (part A) and over their own keys (part B, a ``BlockPlan``), merged exactly through the two
  log-sum-exps (``merge_attention``), so the result equals one forward over ``prompt ++ continuation``.

What is recorded (``keep``) is taken from the same key source the plan attends to: all rows (``True``) or
the rows at an index (a ``BlockPlan`` indexes ``cat([context, rows])``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from patchrec_kernels.varlen_attention import varlen_attention

PACKED_ATTENTION = "patchrec_varlen"

Keep = bool | torch.Tensor | None


@dataclass(eq=False)
class AttentionPlan:
    """Base: ``attend`` one layer; ``keys`` / ``values`` collect what ``keep`` asks for, one per layer."""

    keep: Keep = field(default=None, kw_only=True)  # None: nothing; True: every key row; a tensor: those rows
    keys: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    values: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    # Largest RoPE position of the call (set by the decoder call; read only by the sliding-window check).
    max_position: int | None = field(default=None, init=False, repr=False)

    def attend(self, layer: int, q, k, v, scale: float | None, *, return_lse: bool = False):
        """q [R, Hq, D], k/v [R, Hkv, D] of this call's rows -> [R, Hq, D] (and the fp32 [R, Hq] lse)."""
        raise NotImplementedError

    def record(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keep is None:
            return
        if len(self.keys) != layer:
            raise ValueError(f"plan asked for layer {layer} after {len(self.keys)} layers: one plan per call")
        if self.keep is not True:
            keys, values = keys.index_select(0, self.keep), values.index_select(0, self.keep)
        self.keys.append(keys)
        self.values.append(values)


@dataclass(eq=False)
class PackedPlan(AttentionPlan):
    """Causal attention within each sequence of a packed batch."""

    cu_seqlens: torch.Tensor  # int32 [Q+1] row offsets of the sequences
    max_seqlen: int
    deterministic: bool = True  # bitwise reproducible backward (exact resume); nothing changes without one

    def attend(self, layer, q, k, v, scale, *, return_lse=False):
        self.record(layer, k, v)
        return varlen_attention(
            q, k, v, self.cu_seqlens, self.max_seqlen, causal=True, scale=scale, return_lse=return_lse,
            deterministic=self.deterministic,
            # The packer's offsets are checked once per batch (PackedDecoder.forward); re-checking them in
            # every layer would cost a device sync per layer.
            validate=False,
        )  # fmt: skip


@dataclass(eq=False)
class BlockPlan(AttentionPlan):
    """Query blocks ``cu_q`` over this call's rows; block b's keys are
    ``source[key_index[cu_k[b]:cu_k[b+1]]]`` with ``source = cat([context_keys[layer], rows])`` (the rows
    alone without a context; ``key_index`` None: the rows themselves, packed like the queries). Causal,
    bottom-right aligned: a block's last keys are its own rows."""

    cu_q: torch.Tensor  # int32 [NB+1]
    max_q: int
    cu_k: torch.Tensor  # int32 [NB+1]
    max_k: int
    key_index: torch.Tensor | None = None  # int64 [K] into cat([context, rows])
    context_keys: list[torch.Tensor] | None = None  # per layer [C, Hkv, D] (post-RoPE), e.g. a cached state
    context_values: list[torch.Tensor] | None = None
    deterministic: bool = True

    def __post_init__(self) -> None:
        if (self.context_keys is None) != (self.context_values is None):
            raise ValueError("context_keys and context_values must be given together")

    @classmethod
    def of_layout(cls, layout, *, context_keys=None, context_values=None, keep: Keep = None) -> BlockPlan:
        """The plan of a block layout (anything with ``cu_q``, ``max_q``, ``key_index``, ``cu_k``, ``max_k``,
        e.g. ``patchrec.persrec.layout.BlockLayout``)."""
        return cls(layout.cu_q, layout.max_q, layout.cu_k, layout.max_k, layout.key_index,
                   context_keys, context_values, keep=keep)  # fmt: skip

    def source(self, layer: int, x: torch.Tensor, context: list[torch.Tensor] | None) -> torch.Tensor:
        return x if context is None else torch.cat([context[layer], x])

    def attend(self, layer, q, k, v, scale, *, return_lse=False):
        keys = self.source(layer, k, self.context_keys)
        values = self.source(layer, v, self.context_values)
        self.record(layer, keys, values)
        if self.key_index is not None:
            keys, values = keys.index_select(0, self.key_index), values.index_select(0, self.key_index)
        return varlen_attention(
            q, keys, values, self.cu_q, self.max_q, causal=True, scale=scale, cu_seqlens_k=self.cu_k,
            max_seqlen_k=self.max_k, return_lse=return_lse, deterministic=self.deterministic, validate=False,
        )  # fmt: skip


@dataclass
class PromptCache:
    """Per-layer keys/values (after RoPE) of packed prompts, and what continuations need to read them."""

    keys: list[torch.Tensor]  # per layer [R, Hkv, D]
    values: list[torch.Tensor]  # per layer [R, Hkv, D]
    # int32 [Q+1], prompt rows of each sequence a continuation sees (persrec: state + final block rows)
    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: torch.Tensor  # int64 [Q], prompt rows = RoPE position of the first continuation row
    first_logprobs: torch.Tensor  # fp32 [Q, V], log p(first answer token | prompt)
    sample_ids: torch.Tensor  # int64 [Q], index into the Samples


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from the two parts and their log-sum-exps."""
    lse = torch.logaddexp(lse_a, lse_b)
    # fp32 weights whatever the model dtype: the two parts can differ by many orders of magnitude.
    weight_a, weight_b = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    merged = weight_a * out_a.float() + weight_b * out_b.float()
    return merged.to(out_a.dtype)


@dataclass(eq=False)
class ContinuationPlan(AttentionPlan):
    """Continuation rows grouped by sample (``by_sample_cu`` over the cache's sequences): part A attends to
    the sample's whole cached prompt (non-causal: it all precedes), part B is ``own`` (the rows' own keys,
    and e.g. a beam's earlier tokens); the parts merge through their log-sum-exps. ``own`` records what its
    ``keep`` asks for."""

    cache: PromptCache
    by_sample_cu: torch.Tensor  # int32 [Q+1]: continuation rows of each cached sequence
    by_sample_max: int
    own: BlockPlan

    def attend(self, layer, q, k, v, scale, *, return_lse=False):
        cache = self.cache
        out_a, lse_a = varlen_attention(
            q, cache.keys[layer], cache.values[layer], self.by_sample_cu, self.by_sample_max, causal=False,
            scale=scale, cu_seqlens_k=cache.cu_seqlens, max_seqlen_k=cache.max_seqlen, return_lse=True,
            validate=False,
        )  # fmt: skip
        out_b, lse_b = self.own.attend(layer, q, k, v, scale, return_lse=True)
        out = merge_attention(out_a, lse_a, out_b, lse_b)
        return (out, torch.logaddexp(lse_a, lse_b)) if return_lse else out


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention hook: [1, H, R, Dh] rows -> the call's ``attention_plan`` -> [1, R, Hq, Dh].

    No mask function is registered under this name, so transformers builds no [R, R] mask; which keys a row
    sees comes from the plan alone. Features the plans do not implement are refused by name, never ignored.
    """
    plan = kwargs.get("attention_plan")
    if plan is None or query.shape[0] != 1:
        raise ValueError(
            f"attention {PACKED_ATTENTION!r} needs one packed sequence (batch 1) and an attention_plan: "
            "call the model through PackedDecoder"
        )
    if dropout:
        raise ValueError("attention dropout is not supported on the packed path (set attention_dropout=0)")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attention logit soft-capping (softcap={kwargs['softcap']}) is not supported")
    window = kwargs.get("sliding_window")
    if window is not None and (plan.max_position is None or plan.max_position >= window):
        raise ValueError(
            f"layer {module.layer_idx} uses a sliding window of {window} positions and this call reaches "
            f"position {plan.max_position}: sliding-window attention is not supported beyond the window"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = plan.attend(module.layer_idx, q, k, v, scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)

__all__ = ["PACKED_ATTENTION", "AttentionPlan", "BlockPlan", "ContinuationPlan", "PackedPlan", "PromptCache",
           "merge_attention", "packed_attention"]
