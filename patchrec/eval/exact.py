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
3. ``score_titles`` runs the (deduplicated) catalog titles padding-free, as many as fit in a row budget, and
   reads log p(title tokens, eot) from the output head on those rows only (in slices so the
   [rows, vocab] logits stay small). By default titles that share a token prefix share its rows
   (``PrefixTree``: one row per distinct prefix, attending to the prompt and to its own prefix; ML-1M's
   titles under Llama-3 are 15,135 title rows and 11,286 distinct prefixes), which gives the same scores
   up to fp32 rounding; ``shared_prefixes=False`` runs one causal sequence per title.
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

# fp32 logits held at once by the output head ([rows, vocab] slices): 2^23 floats = 32 MiB. Larger slices ran
# slower on CPU (measured 1.7 ms per 128k-vocabulary row at 2^23, 2.6 ms at 2^25): each is a fresh buffer
# past glibc's mmap threshold, page-faulted anew, and the slice plus its exp outgrow the caches.
LOGIT_ELEMENTS = 1 << 23


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

    def prefix_tree(self, eot: int) -> PrefixTree:
        """The titles' ``PrefixTree``, built once per ``eot`` and kept with the catalog (~1 s for ML-1M)."""
        trees = self.__dict__.setdefault("_prefix_trees", {})  # frozen: the cache bypasses __setattr__
        if eot not in trees:
            trees[eot] = PrefixTree.from_catalog(self, eot)
        return trees[eot]


@dataclass(frozen=True)
class PrefixTree:
    """The distinct titles as a token trie: one continuation row per distinct prefix (a node), in depth-first
    order, so that every first token's subtree is a contiguous range of nodes.

    A node's row feeds its prefix's last token at RoPE position prompt + depth - 1 and attends to the prompt
    and to the nodes of its own path, exactly the keys a title's row sees in its own causal sequence. A
    title's score is the first token's log-prob after the prompt plus, along its path, log p(next token)
    at each node and log p(eot) at its last node: ``pairs`` lists those (node, label) terms once each."""

    tokens: np.ndarray  # int64 [M], the last token of each node's prefix
    depth: np.ndarray  # int64 [M], prefix length (1: a title's first token)
    path_offsets: np.ndarray  # int64 [M+1], CSR over ``path``
    path: np.ndarray  # int64 [sum depth], each node's path from its first-token node to itself
    roots: np.ndarray  # int64 [F+1], node ranges of the first-token subtrees (depth-first order)
    pair_node: np.ndarray  # int64 [P], node of each scored (node, label) term
    pair_label: np.ndarray  # int64 [P], its label: the next title token, or eot
    title_pairs_offsets: np.ndarray  # int64 [U+1], CSR over ``title_pairs``
    title_pairs: np.ndarray  # int64 [sum title lengths], the terms along each title

    @classmethod
    def from_catalog(cls, catalog: CatalogTitles, eot: int) -> PrefixTree:
        if (catalog.tokens == eot).any():
            raise ValueError(f"eot id {eot} occurs inside a title: title ends would be ambiguous")
        titles = [tuple(catalog.title(u).tolist()) for u in range(len(catalog))]
        child: dict[tuple[int, int], int] = {}  # (parent node or -1, token) -> node
        tokens, depth, parent, roots = [], [], [], []
        title_nodes: list[list[int]] = [[] for _ in titles]
        for u in sorted(range(len(titles)), key=titles.__getitem__):  # sorted: nodes in depth-first order
            node = -1
            for tok in titles[u]:
                nxt = child.get((node, tok))
                if nxt is None:
                    nxt = child[(node, tok)] = len(tokens)
                    if node < 0:
                        roots.append(nxt)
                    tokens.append(tok)
                    depth.append(1 if node < 0 else depth[node] + 1)
                    parent.append(node)
                node = nxt
                title_nodes[u].append(node)
        paths = []
        for node in range(len(tokens)):
            paths.append(paths[parent[node]] + [node] if parent[node] >= 0 else [node])
        pair_of: dict[tuple[int, int], int] = {}
        title_pairs = []
        for u, nodes in enumerate(title_nodes):
            terms = zip(nodes, list(titles[u][1:]) + [eot], strict=True)
            title_pairs.append([pair_of.setdefault(term, len(pair_of)) for term in terms])
        pairs = np.array(list(pair_of), dtype=np.int64).reshape(-1, 2)
        csr = lambda parts: np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)  # noqa: E731
        flat = lambda parts: np.array([x for p in parts for x in p], dtype=np.int64)  # noqa: E731
        return cls(np.array(tokens, dtype=np.int64), np.array(depth, dtype=np.int64), csr(paths), flat(paths),
                   np.array(roots + [len(tokens)], dtype=np.int64), pairs[:, 0], pairs[:, 1],
                   csr(title_pairs), flat(title_pairs))  # fmt: skip

    def __len__(self) -> int:
        return len(self.tokens)

    def chunks(self, budget: int) -> list[tuple[int, int]]:
        """Node ranges [lo, hi) of whole first-token subtrees, at most ``budget`` nodes each (a larger
        subtree goes alone)."""
        sizes = np.diff(self.roots)
        return [(int(self.roots[a]), int(self.roots[b])) for a, b in title_chunks(sizes, budget)]


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
    shared_prefixes: bool = True, state: PersrecState | None = None,
) -> torch.Tensor:  # fmt: skip
    """fp32 [Q, U]: log p(title_u tokens, eot | prompt q) for every sequence of a prompt-only batch
    (``persrec_cache``, ``state``: see ``encode_prompts``; ``shared_prefixes``: one row per distinct title
    prefix, ``catalog.prefix_tree``, or False for one causal sequence per title)."""
    cache = encode_prompts(model, batch, persrec_cache=persrec_cache, state=state)
    if not shared_prefixes:
        return _score_flat(model, cache, catalog, eot, max_rows)
    return _score_tree(model, cache, catalog, catalog.prefix_tree(eot), max_rows)


def _score_tree(model, cache: PromptCache, catalog: CatalogTitles, tree: PrefixTree, max_rows: int):
    device = cache.first_logprobs.device
    num_seq = len(cache.lengths)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    pair_logp = torch.empty(num_seq, len(tree.pair_node), dtype=torch.float32, device=device)
    budget = max(max_rows // max(num_seq, 1), int(np.diff(tree.roots).max(initial=1)))
    for lo, hi in tree.chunks(budget):
        n_node = hi - lo
        depth = tree.depth[lo:hi]
        # Each node is a one-row block whose keys are its path's nodes (its own row last).
        path = tree.path[tree.path_offsets[lo] : tree.path_offsets[hi]] - lo
        key_cu = t(np.concatenate([[0], np.cumsum(depth)]))
        keys_per_seq = int(key_cu[-1])
        seq = torch.arange(num_seq, device=device)
        key_index = (t(path)[None, :] + seq[:, None] * n_node).ravel()
        cu_k = torch.cat([key_cu.new_zeros(1), (key_cu[1:][None, :] + seq[:, None] * keys_per_seq).ravel()])
        cu_q = torch.arange(num_seq * n_node + 1, device=device, dtype=torch.int32)
        own = BlockPlan(cu_q, 1, cu_k.to(torch.int32), int(depth.max()), key_index)
        token_ids = t(tree.tokens[lo:hi]).repeat(num_seq)
        position_ids = t(depth - 1).repeat(num_seq) + cache.lengths.repeat_interleave(n_node)
        by_sample_cu = (torch.arange(num_seq + 1, device=device) * n_node).to(torch.int32)
        hidden = forward_continuations(model, cache, token_ids, position_ids, by_sample_cu, n_node, own)
        # The (node, label) terms of this chunk's nodes: pairs are numbered title by title, so select them.
        in_chunk = np.flatnonzero((tree.pair_node >= lo) & (tree.pair_node < hi))
        rows = t(tree.pair_node[in_chunk] - lo)
        rows = (rows[None, :] + seq[:, None] * n_node).ravel()
        labels = t(tree.pair_label[in_chunk]).repeat(num_seq)
        logp = pair_logprobs(model, hidden, rows, labels)
        pair_logp[:, t(in_chunk)] = logp.view(num_seq, len(in_chunk))
    first = t(catalog.tokens[catalog.offsets[:-1]])
    title_of = t(np.repeat(np.arange(len(catalog)), np.diff(tree.title_pairs_offsets)))
    sums = torch.zeros(num_seq, len(catalog), dtype=torch.float32, device=device)
    sums.index_add_(1, title_of, pair_logp[:, t(tree.title_pairs)])
    return cache.first_logprobs[:, first] + sums


def pair_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 [P]: log p(labels[p] | hidden row rows[p]), the output head run once per hidden row (in slices
    of rows, like ``token_logprobs``) however many labels read that row."""
    step = max(1, LOGIT_ELEMENTS // max(model.vocab_size, 1))
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    starts = torch.arange(0, hidden.shape[0] + step, step, device=rows.device)
    bounds = torch.searchsorted(sorted_rows, starts)
    for i, lo in enumerate(range(0, hidden.shape[0], step)):
        a, b = int(bounds[i]), int(bounds[i + 1])
        if a == b:
            continue
        logits = model.logits(hidden[lo : lo + step]).float()
        lse = torch.logsumexp(logits, dim=-1)
        local = sorted_rows[a:b] - lo
        picked = order[a:b]
        out[picked] = logits[local, labels[picked]] - lse[local]
    return out


def _score_flat(model, cache: PromptCache, catalog: CatalogTitles, eot: int, max_rows: int) -> torch.Tensor:
    device = cache.first_logprobs.device
    num_seq = len(cache.lengths)
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
