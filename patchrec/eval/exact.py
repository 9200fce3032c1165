"""Exact whole-catalog scoring: the log-likelihood of every catalog title as the answer to a prompt, with the
prompt run once per sample (docs/method.md §5, "a stronger protocol").

How a title is scored without a forward pass per (prompt, title):

1. ``encode_prompts`` runs the packed prompts (``iter_batches(answer=False)``) through the model's own
   decoder (``PackedDecoder.decode`` with a recording ``PackedPlan``) and keeps every layer's keys/values
   after RoPE, plus the log-softmax at each prompt's last row (it predicts the first title token).
2. ``forward_continuations`` runs continuation rows (title tokens, or beam-search tokens) whose RoPE positions
   continue from the prompt length, through the same decoder with a ``ContinuationPlan``: in every layer
   their attention has two parts over disjoint key sets, A = non-causal varlen attention over the cached
   prompt keys of their sample, and B = causal varlen attention over the continuation's own keys. Softmax
   attention over the union of the two key sets is exactly ``exp(lse_A - lse) * out_A + exp(lse_B - lse) *
   out_B`` with ``lse = logaddexp(lse_A, lse_B)``, so the result equals a full forward of
   ``prompt ++ title``.
3. ``score_titles`` packs the (deduplicated) catalog titles padding-free, as many as fit in a row budget, and
   reads log p(title tokens, eot) from the output head on those rows only (in slices so the
   [rows, vocab] logits stay small).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchrec.batching.packed import PackedBatch
from patchrec.batching.tokens import TitleTable
from patchrec.model.attention import BlockPlan, ContinuationPlan, PackedPlan, PromptCache
from patchrec.persrec.llm import CACHE_MODES, encode_cached, encode_full, encode_with_state
from patchrec.persrec.state import PersrecState

# fp32 logits held at once by the output head ([rows, vocab] slices): 2^25 floats = 128 MiB.
LOGIT_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class CatalogTitles:
    """The catalog's distinct titles (docs/method.md §5: duplicate titles are one item), CSR over token ids.

    Titles are compared by their token ids, which is string equality for any lossless tokenizer; the trie of
    the beam search merges equal token sequences in the same way, so both rankings agree on what "one
    title" is.
    """

    offsets: np.ndarray  # int64 [U+1]
    tokens: np.ndarray  # int64 [offsets[-1]]
    item_title: np.ndarray  # int64 [N], distinct-title index of every item
    canonical: np.ndarray  # int64 [U], lowest item id carrying each distinct title

    @classmethod
    def from_table(cls, table: TitleTable) -> CatalogTitles:
        index: dict[bytes, int] = {}
        item_title = np.empty(len(table), dtype=np.int64)
        firsts: list[int] = []
        for item in range(len(table)):
            key = table.title(item).astype(np.int64).tobytes()
            if key not in index:
                index[key] = len(firsts)
                firsts.append(item)
            item_title[item] = index[key]
        canonical = np.asarray(firsts, dtype=np.int64)
        lengths = table.lengths[canonical]
        offsets = np.zeros(len(canonical) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([table.title(i) for i in canonical]).astype(np.int64) if len(canonical) else (
            np.zeros(0, dtype=np.int64)
        )
        return cls(offsets, tokens, item_title, canonical)

    def __len__(self) -> int:
        return len(self.canonical)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def title(self, u: int) -> np.ndarray:
        return self.tokens[self.offsets[u] : self.offsets[u + 1]]


def token_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 [R]: log p(labels[r] | row r), through the model's output head in slices of rows."""
    step = max(1, LOGIT_ELEMENTS // max(model.vocab_size, 1))
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, hidden.shape[0], step):
        logits = model.logits(hidden[lo : lo + step]).float()
        picked = logits.gather(1, labels[lo : lo + step, None]).squeeze(1)
        out[lo : lo + step] = picked - torch.logsumexp(logits, dim=-1)
    return out


def encode_prompts(
    model, batch: PackedBatch, *, persrec_cache: str = "on", state: PersrecState | None = None
) -> PromptCache:
    """Run a packed prompt-only batch once; keep every layer's K/V and the first-token distribution.

    A persrec batch (with a block layout) keeps only what a continuation may see, the state (prefix and T
    rows) and the final block, computed in one pass (``persrec_cache="off"``) or from a state built first
    from the prefix and old segments (``"on"``); see ``patchrec.persrec.llm``. ``state`` (one user per
    sequence, e.g. a server's stored states) replaces the state the prompts' old blocks would give: only the
    final blocks run (``encode_with_state``)."""
    if state is not None:
        if batch.layout is None:
            raise ValueError("state applies to the persrec plan's segments and window layouts")
        return encode_with_state(model, batch, state)
    if batch.layout is not None:
        if persrec_cache not in CACHE_MODES:
            raise ValueError(f"--persrec-cache must be one of {CACHE_MODES}, got {persrec_cache!r}")
        return encode_cached(model, batch) if persrec_cache == "on" else encode_full(model, batch)
    plan = PackedPlan(batch.cu_seqlens, batch.max_seqlen, keep=True)
    hidden = model.decode(model.embed(batch), batch.position_ids, plan)
    last = batch.cu_seqlens[1:].long() - 1
    return PromptCache(
        keys=plan.keys,
        values=plan.values,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        lengths=batch.cu_seqlens.diff().long(),
        first_logprobs=model.logprobs(hidden.index_select(0, last)),
        sample_ids=batch.sample_ids,
    )


def forward_continuations(
    model,
    cache: PromptCache,
    token_ids: torch.Tensor,
    position_ids: torch.Tensor,
    by_sample_cu: torch.Tensor,
    by_sample_max: int,
    own: BlockPlan,
) -> torch.Tensor:
    """Final hidden states [T, D] of continuation rows that attend to their sample's cached prompt.

    token_ids, position_ids: [T], rows grouped by sample in the cache's order; ``by_sample_cu`` [Q+1] gives
    each sample's rows (part A: non-causal over that sample's prompt keys). ``own`` is part B (causal,
    bottom-right aligned), e.g. one sequence per title, or a beam's cached tokens followed by its new one;
    it records whatever its ``keep`` asks for.
    """
    plan = ContinuationPlan(cache, by_sample_cu, by_sample_max, own)
    return model.decode(model.embed_tokens(token_ids), position_ids, plan)


def title_chunks(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive title ranges [lo, hi) of at most ``budget`` tokens each (a longer title goes alone)."""
    chunks = []
    lo, total = 0, 0
    for u, n in enumerate(lengths.tolist()):
        if u > lo and total + n > budget:
            chunks.append((lo, u))
            lo, total = u, 0
        total += n
    if lo < len(lengths):
        chunks.append((lo, len(lengths)))
    return chunks


def score_titles(
    model, batch: PackedBatch, catalog: CatalogTitles, eot: int, *, max_rows: int, persrec_cache: str = "on",
    state: PersrecState | None = None,
) -> torch.Tensor:  # fmt: skip
    """fp32 [Q, U]: log p(title_u tokens, eot | prompt q) for every sequence of a prompt-only batch
    (``persrec_cache``, ``state``: see ``encode_prompts``)."""
    device = batch.cu_seqlens.device
    cache = encode_prompts(model, batch, persrec_cache=persrec_cache, state=state)
    num_seq = batch.num_sequences
    lengths = catalog.lengths
    # Title rows of one pass = sequences x chunk tokens; the chunk takes the budget's share per sequence.
    budget = max(max_rows // max(num_seq, 1), int(lengths.max(initial=1)))
    first = torch.as_tensor(catalog.tokens[catalog.offsets[:-1]], device=device)
    scores = cache.first_logprobs[:, first].clone()
    for lo, hi in title_chunks(lengths, budget):
        tlen = lengths[lo:hi]
        toks = catalog.tokens[catalog.offsets[lo] : catalog.offsets[hi]]
        n_tok, n_title = len(toks), hi - lo
        ends = np.cumsum(tlen)
        within = np.arange(n_tok) - np.repeat(ends - tlen, tlen)
        # Row j of a title predicts its token j+1; its last row predicts eot.
        labels = np.append(toks[1:], eot)
        labels[ends - 1] = eot
        title_of_row = np.repeat(np.arange(n_title), tlen)

        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        token_ids = t(toks).repeat(num_seq)
        position_ids = t(within).repeat(num_seq) + cache.lengths.repeat_interleave(n_tok)
        by_sample_cu = (torch.arange(num_seq + 1, device=device) * n_tok).to(torch.int32)
        title_cu = torch.as_tensor(np.concatenate([[0], ends]), device=device)
        starts = (torch.arange(num_seq, device=device)[:, None] * n_tok + title_cu[None, :-1]).ravel()
        own_cu = torch.cat([starts, title_cu.new_full((1,), num_seq * n_tok)]).to(torch.int32)
        max_title = int(tlen.max())

        own = BlockPlan(own_cu, max_title, own_cu, max_title)
        hidden = forward_continuations(model, cache, token_ids, position_ids, by_sample_cu, n_tok, own)
        logp = token_logprobs(model, hidden, t(labels).repeat(num_seq))
        sample_of_row = torch.arange(num_seq, device=device).repeat_interleave(n_tok)
        index = t(title_of_row).repeat(num_seq) + sample_of_row * n_title
        sums = torch.zeros(num_seq * n_title, dtype=torch.float32, device=device).index_add_(0, index, logp)
        scores[:, lo:hi] += sums.view(num_seq, n_title)
    return scores
