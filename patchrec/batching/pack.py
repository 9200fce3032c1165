"""Packed, padding-free batches: samples + plan -> the inputs of ``patch_embed`` and a varlen Llama.

Row layout of one sequence (one sample, or one view of a pre-training sample):

    prompt prefix (one row per token) | <|start_seq|> | piece <|item_sep|> piece ... piece | <|end_seq|> |
    prompt suffix (one row per token) | answer title (one row per token)

A TEXT item is one row per title token; an ITEM patch one row with one segment (the title's tokens); a
SESSION patch one row with one segment per member item. The separator after a patch or session stays; DROP
items vanish with their separator. The answer's end-of-turn token is a label but NOT an input row (its hidden
state would predict nothing). Label ``i`` of a sequence with answer ``a_0..a_{m-1}, eot`` is predicted by the
row just before it: the last suffix row predicts ``a_0``, the row of ``a_{j-1}`` predicts ``a_j``, the row of
``a_{m-1}`` predicts ``eot``.

PerSRec (``persrec`` plan; layouts in ``patchrec.batching.persrec_layouts``):

- ``segments``: after the separator that closes each full old-history segment the sequence gets the k
  personalization-token rows ``T_1..T_k`` (one row each), and the batch carries a ``BlockLayout``
  (``patchrec.batching.blocks``): block 0 of a sequence is the prompt prefix + ``<|start_seq|>`` (carried:
  every later block sees it), then one block per old segment (its items and separators, then its T rows; the
  T rows are carried), then the final block (the recent items, ``<|end_seq|>``, the prompt suffix and the
  answer). In the slot grid the T rows are part of the separator slot (the source holds the separator
  followed by the T ids), so the layout costs no extra slots.
- ``window``: the same with one old block, the old window (the items before the newest R); a history with no
  old items puts the T rows right after ``<|start_seq|>`` (in the head block, carried with it).
- ``rolling``: the prompt holds only the open segment (the newest 1..N items); right after ``<|start_seq|>``
  come k **memory rows** (``memory_rows``), whose inputs are the user's memory: the T tokens' embeddings
  before any segment is folded, else the final hidden states of the T rows of the last folded segment. The
  folded segments travel with the batch as ``folds``: pass j holds segment j of every sequence that has it,
  each as its own causal sequence ``[k memory rows][its N items and separators][T_1..T_k]``.
  ``PackedDecoder.embed`` runs the passes and writes the memory rows (``patchrec.model.decoder``).

Speed: nothing here loops over samples in Python. A chunk of samples is planned as ``[B, L]`` arrays, each
sequence is laid out as ``2L+3`` "slots" (head, item/separator pairs, tail, answer), every non-empty slot is
one contiguous range of a single token source (the catalog CSR table followed by the prompt's literal tokens),
and the batch's token ids, segment offsets and row offsets come from repeat/cumsum over those ranges.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from patchrec.batching.packed import FoldPass, PackedBatch
from patchrec.batching.persrec_layouts import PersrecConfig, old_items
from patchrec.batching.plan import DROP, PAD, TEXT, BatchPlan, Planner
from patchrec.batching.slots import Slots, split_folds
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Samples

# Samples planned at once; bounds the [chunk, L] planning arrays (~10 MB at L = 100) while keeping numpy calls
# large enough that per-call overhead is negligible.
PLAN_CHUNK = 4096


class Packer:
    """Packs samples of one dataset with one tokenisation; holds the combined token source."""

    def __init__(self, tokens: TokenizedDataset, answer: bool = True):
        self.tokens = tokens
        self.answer = answer  # False: prompt only (no answer rows, no labels), e.g. for scoring candidates
        titles, prompt = tokens.titles, tokens.prompt
        self.title_offsets = titles.offsets
        self.title_lengths = titles.lengths.astype(np.int32)
        # One source array so that every slot is a range of it: titles, then head (prefix + start_seq), the T
        # ids, separator, the T ids again, tail (end_seq + suffix): "head + T", "T" and "separator + T" are
        # single ranges (PerSRec puts its T rows after either).
        head = np.concatenate([prompt.prefix, [prompt.start_seq]]).astype(np.int32)
        tail = np.concatenate([[prompt.end_seq], prompt.suffix]).astype(np.int32)
        base = len(titles.tokens)
        self.head_src, self.head_len = base, len(head)
        self.persrec_ids = np.asarray(tokens.persrec_ids, dtype=np.int32)
        k = len(self.persrec_ids)
        self.t_src = base + len(head)
        self.sep_src = self.t_src + k
        self.tail_src, self.tail_len = self.sep_src + 1 + k, len(tail)
        self.source = np.concatenate(
            [titles.tokens, head, self.persrec_ids, [prompt.item_sep], self.persrec_ids, tail]
        ).astype(np.int32)
        self.eot = prompt.eot

    # ---- layout -------------------------------------------------------------------------------------------
    def history_items(self, samples: Samples, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``[B, width]`` history item ids (oldest first, -1 padded) and history lengths."""
        starts = samples.hist_start[ids]
        lengths = samples.target_index[ids] - starts
        cols = np.arange(width)
        valid = cols < lengths[:, None]
        idx = np.where(valid, starts[:, None] + cols, 0)
        return np.where(valid, samples.dataset.items[idx], -1).astype(np.int64), lengths

    def slots(
        self, items: np.ndarray, plan: BatchPlan, targets: np.ndarray,
        persrec: PersrecConfig | tuple[int, int] | None = None,
    ) -> Slots:  # fmt: skip
        """Per sequence ``2L+3`` slots: source start, token count, whether each token is its own row
        (``run``) or the slot is one segment (patch), and whether that segment opens a new row.

        ``persrec`` (a ``PersrecConfig``, or (segment, tokens) for the segments layout): the T rows go into
        the slot that closes each old block, ``block_end`` marks those slots; the rolling layout keeps only
        the open segment in the prompt, k memory rows after ``<|start_seq|>``, and the folded items for the
        fold passes (see the module docstring)."""
        config = _persrec_config(persrec)
        if config is not None and config.tokens > len(self.persrec_ids):
            have = len(self.persrec_ids)
            raise ValueError(f"--persrec-tokens {config.tokens} but the tokenisation has {have} PerSRec "
                             "tokens: tokenize_dataset(..., persrec_tokens=k)")  # fmt: skip
        kinds, group = plan.kinds, plan.group
        before = np.where(kinds != PAD, self.title_lengths[np.maximum(items, 0)], 0).sum(axis=1)
        if config is not None and config.layout == "rolling":
            fold, items, kinds, group = split_folds(items, kinds, group, config)
            s = self.grid(items, kinds, group, targets, before)
            self.add_memory(s, fold, config)
        else:
            s = self.grid(items, kinds, group, targets, before)
            if config is not None:
                self.add_blocks(s, (kinds != PAD).sum(axis=1), config)
        s.rows = s.slot_rows().sum(axis=1)
        return s

    def grid(self, items: np.ndarray, kinds: np.ndarray, group: np.ndarray, targets: np.ndarray,
             before: np.ndarray) -> Slots:  # fmt: skip
        """The slots of plain sequences (no PerSRec rows); ``rows`` is left to the caller."""
        num, width = kinds.shape
        safe = np.maximum(items, 0)
        tlen = self.title_lengths[safe]
        kept = (kinds != PAD) & (kinds != DROP)
        # A session patch's first member opens its row; later members only add segments to it.
        prev = np.full_like(group, -1)
        prev[:, 1:] = np.maximum.accumulate(group, axis=1)[:, :-1]
        opens = kept & (group != prev)
        # Separator after the last item of a piece when a later kept item exists (in another piece).
        big = np.iinfo(np.int32).max
        later = np.where(kept, group, big)
        # Groups never decrease over kept items: the suffix minimum from j+1 is the next kept item's group.
        nxt = np.full_like(later, big)
        nxt[:, :-1] = np.minimum.accumulate(later[:, ::-1], axis=1)[:, ::-1][:, 1:]
        sep = kept & (nxt != group) & (nxt != big)

        src = np.empty((num, 2 * width + 3), dtype=np.int64)
        ntok = np.zeros((num, 2 * width + 3), dtype=np.int32)
        run = np.ones((num, 2 * width + 3), dtype=bool)
        newrow = np.ones((num, 2 * width + 3), dtype=bool)
        src[:, 0], ntok[:, 0] = self.head_src, self.head_len
        src[:, 1 : 2 * width + 1 : 2] = self.title_offsets[safe]
        ntok[:, 1 : 2 * width + 1 : 2] = np.where(kept, tlen, 0)
        run[:, 1 : 2 * width + 1 : 2] = kinds == TEXT
        newrow[:, 1 : 2 * width + 1 : 2] = opens
        src[:, 2 : 2 * width + 2 : 2] = self.sep_src
        ntok[:, 2 : 2 * width + 2 : 2] = sep
        src[:, -2], ntok[:, -2] = self.tail_src, self.tail_len
        src[:, -1] = self.title_offsets[targets]
        ntok[:, -1] = self.title_lengths[targets] if self.answer else 0
        after = np.where(kinds == TEXT, tlen, 0).sum(axis=1) + (opens & (kinds != TEXT)).sum(axis=1)
        return Slots(src, ntok, run, newrow, np.zeros(num, dtype=np.int64), before, after)

    def add_memory(self, s: Slots, fold: tuple[np.ndarray, np.ndarray], config: PersrecConfig) -> None:
        """Rolling layout: k memory rows after ``<|start_seq|>`` (the T ids as placeholders) and the folded
        items ``fold`` (``split_folds``) with their rows in the fold passes."""
        num, k = len(s.before), config.tokens
        s.ntok[:, 0] += k  # prefix + <|start_seq|> + k memory rows
        s.after = s.after + k
        s.fold_items, s.fold_text = fold
        frows = np.where(s.fold_text[:, None], self.title_lengths[np.maximum(s.fold_items, 0)], 1)
        folded = (s.fold_items >= 0).sum(axis=1)
        # per segment: k memory rows, its items, N separators (the last one followed by k T rows)
        per_item = np.where(s.fold_items >= 0, frows, 0).sum(axis=1)
        s.fold_rows = per_item + folded + folded // config.segment * 2 * k
        s.fold_segment, s.fold_tokens = np.full(num, config.segment), np.full(num, k)
        s.fold_unroll = np.full(num, config.unroll)

    def add_blocks(self, s: Slots, lengths: np.ndarray, config: PersrecConfig) -> None:
        """Segments / window layouts: the T rows in the slot that closes each old block, ``block_end``."""
        num, slots = s.ntok.shape
        width, k = (slots - 3) // 2, config.tokens
        old = old_items(config, lengths)
        j = np.arange(width)
        if config.layout == "window":
            # One old block; a history without old items puts the T rows after <|start_seq|>.
            closes = (j + 1 == old[:, None]) & (old[:, None] > 0)
            s.ntok[:, 0] += np.where(old > 0, 0, k).astype(np.int32)
            s.after = s.after + k
        else:
            # The separator after item j closes a segment when j + 1 is a multiple of the segment inside
            # the old items (every old item has a later kept item, so its separator exists).
            closes = ((j + 1) % config.segment == 0) & (j + 1 <= old[:, None])
            s.after = s.after + closes.sum(axis=1) * k
        s.ntok[:, 2 : 2 * width + 2 : 2] += np.where(closes, k, 0).astype(np.int32)
        s.block_end = np.zeros((num, slots), dtype=bool)
        s.block_end[:, 0] = True
        s.block_end[:, 2 : 2 * width + 2 : 2] = closes

    def plan_slots(
        self, samples: Samples, ids: np.ndarray, planner: Planner, rng, progress: np.ndarray | None
    ) -> Slots:
        """Plan ``ids`` and lay out their sequences, views interleaved (views of sample 0, then of 1, ...)."""
        width = int(samples.history_lengths[ids].max(initial=0))
        items, lengths = self.history_items(samples, ids, width)
        views = planner.plan_batch(lengths, rng, progress, width)
        targets = samples.dataset.items[samples.target_index[ids]].astype(np.int64)
        if len(views) == 1:
            out = self.slots(items, views[0], targets, planner.persrec)
        else:
            v = len(views)
            kinds = np.stack([p.kinds for p in views], 1).reshape(-1, width)
            group = np.stack([p.group for p in views], 1).reshape(-1, width)
            out = self.slots(np.repeat(items, v, 0), BatchPlan(kinds, group), np.repeat(targets, v))
        out.sample = np.repeat(ids, len(views))
        out.view = np.tile(np.arange(len(views)), len(ids))
        out.target = np.repeat(targets, len(views))
        return out

    # ---- materialisation ---------------------------------------------------------------------------------
    def build(self, s: Slots) -> PackedBatch:
        """Slots of Q sequences -> PackedBatch (with the rolling layout's memory rows and fold passes)."""
        batch = self.materialize(s, self.answer)
        if s.fold_items is None:
            return batch
        q = batch.num_sequences
        k = int(s.fold_tokens[0]) if q else 0
        cu = batch.cu_seqlens.numpy().astype(np.int64)
        batch.memory_rows = torch.from_numpy((cu[:-1, None] + self.head_len + np.arange(k)).reshape(-1))
        batch.memory_ids = torch.from_numpy(self.persrec_ids[:k].astype(np.int64))
        batch.folds = self.fold_passes(s)
        batch.fold_unroll = int(s.fold_unroll[0]) if q else 0
        return batch

    def fold_passes(self, s: Slots) -> list[FoldPass]:
        """The rolling layout's fold passes: pass j holds segment j of every sequence with more than j
        folded segments, each as ``[k memory rows][N items and separators][T_1..T_k]``."""
        fitems = s.fold_items
        if fitems.size == 0:
            return []
        n, k = int(s.fold_segment[0]), int(s.fold_tokens[0])
        segments = (fitems >= 0).sum(axis=1) // n
        passes = []
        for j in range(int(segments.max(initial=0))):
            owner = np.flatnonzero(segments > j)
            passes.append(self.fold_pass(fitems[owner, j * n : (j + 1) * n], s.fold_text[owner], k, owner))
        return passes

    def fold_pass(self, items: np.ndarray, text, k: int, owner: np.ndarray | None = None) -> FoldPass:
        """A fold pass of whole segments ``items`` [F, N], each as text or item patches (``text``: a bool, or
        one per segment), e.g. to fold a served user's newest segment into their memory; ``owner`` (the
        sequence each segment's memory belongs to) defaults to 0..F-1."""
        items = np.asarray(items, dtype=np.int64)
        if items.ndim != 2 or items.size == 0 or items.min() < 0 or items.max() >= len(self.title_lengths):
            raise ValueError(f"items must be [F, N] catalog ids in [0, {len(self.title_lengths)})")
        if not 1 <= k <= len(self.persrec_ids):
            raise ValueError(f"k must be in [1, {len(self.persrec_ids)}] (the tokenisation's PerSRec tokens)")
        num = len(items)
        fold = self.segment_slots(items, np.broadcast_to(np.asarray(text, dtype=bool), (num,)), k)
        fold.sample = fold.view = fold.target = np.zeros(num, dtype=np.int64)
        batch = self.materialize(fold, answer=False)
        cu = batch.cu_seqlens.numpy().astype(np.int64)
        owner = np.arange(num) if owner is None else np.asarray(owner, dtype=np.int64)
        t = torch.from_numpy
        return FoldPass(batch, t(owner), t((cu[:-1, None] + np.arange(k)).reshape(-1)),
                        t((cu[1:, None] - k + np.arange(k)).reshape(-1)))  # fmt: skip

    def segment_slots(self, items: np.ndarray, text: np.ndarray, k: int) -> Slots:
        """Slots of folded segments ``items`` [F, N] (text or item patches per row): k T ids as memory
        placeholders, the items with a separator after each, the last separator followed by the k T rows."""
        num, n = items.shape
        tlen = self.title_lengths[items]
        src = np.zeros((num, 2 * n + 3), dtype=np.int64)
        ntok = np.zeros((num, 2 * n + 3), dtype=np.int32)
        run = np.ones((num, 2 * n + 3), dtype=bool)
        newrow = np.ones((num, 2 * n + 3), dtype=bool)
        src[:, 0], ntok[:, 0] = self.t_src, k
        src[:, 1 : 2 * n + 1 : 2] = self.title_offsets[items]
        ntok[:, 1 : 2 * n + 1 : 2] = tlen
        run[:, 1 : 2 * n + 1 : 2] = text[:, None]
        src[:, 2 : 2 * n + 2 : 2] = self.sep_src
        ntok[:, 2 : 2 * n + 2 : 2] = 1
        ntok[:, 2 * n] += k
        zeros = np.zeros(num, dtype=np.int64)
        s = Slots(src, ntok, run, newrow, zeros, zeros, zeros)
        s.rows = s.slot_rows().sum(axis=1)
        return s

    def materialize(self, s: Slots, answer: bool) -> PackedBatch:
        """Slots of Q sequences -> the PackedBatch of their rows (labels when ``answer``)."""
        ntok_all = s.ntok.ravel()
        keep = ntok_all > 0
        src = s.src.ravel()[keep]
        ntok = ntok_all[keep].astype(np.int64)
        run = s.run.ravel()[keep]
        newrow = s.newrow.ravel()[keep]

        # Tokens: each kept slot is the source range [src, src + ntok).
        tok_end = np.cumsum(ntok)
        num_tok = int(tok_end[-1]) if len(tok_end) else 0
        idx = np.repeat(src - (tok_end - ntok), ntok) + np.arange(num_tok)
        token_ids = self.source[idx]

        # Segments: a run slot is ntok one-token segments, a patch slot one ntok-token segment.
        nseg = np.where(run, ntok, 1)
        seg_len = np.repeat(np.where(run, 1, ntok), nseg)
        seg_offsets = np.zeros(len(seg_len) + 1, dtype=np.int64)
        np.cumsum(seg_len, out=seg_offsets[1:])
        opens = run | newrow
        if opens.all():
            row_offsets = np.arange(len(seg_len) + 1, dtype=np.int64)
        else:
            row_offsets = np.append(np.flatnonzero(np.repeat(opens, nseg)), len(seg_len)).astype(np.int64)

        rows = s.rows.astype(np.int64)
        cu = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(rows, out=cu[1:])
        num_rows = int(cu[-1])
        position_ids = np.arange(num_rows, dtype=np.int64) - np.repeat(cu[:-1], rows)

        # Labels: answer title + eot; the first is predicted by the last suffix row.
        q = len(rows)
        if answer:
            m = self.title_lengths[s.target].astype(np.int64)
            nlab = m + 1
            lab_end = np.cumsum(nlab)
            within = np.arange(int(lab_end[-1]) if q else 0) - np.repeat(lab_end - nlab, nlab)
            label_rows = np.repeat(cu[1:] - m - 1, nlab) + within
            title_pos = np.repeat(self.title_offsets[s.target], nlab) + within
            is_eot = within == np.repeat(m, nlab)
            title_tok = self.source[np.where(is_eot, 0, title_pos)]
            label_ids = np.where(is_eot, self.eot, title_tok).astype(np.int64)
            label_sample = np.repeat(np.arange(q, dtype=np.int64), nlab)
        else:
            label_rows = label_ids = label_sample = np.zeros(0, dtype=np.int64)

        layout = carried = None
        if s.block_end is not None:
            layout, carried = s.block_layout(cu)

        t = torch.from_numpy
        return PackedBatch(
            layout=layout,
            block_carried=carried,
            token_ids=t(token_ids),
            seg_offsets=t(seg_offsets),
            row_offsets=t(row_offsets),
            cu_seqlens=t(cu.astype(np.int32)),
            position_ids=t(position_ids),
            max_seqlen=int(rows.max(initial=0)),
            label_rows=t(label_rows),
            label_ids=t(label_ids),
            label_sample=t(label_sample),
            sample_ids=t(s.sample.astype(np.int64)),
            view_ids=t(s.view.astype(np.int64)),
            hist_tokens_before=t(s.before.astype(np.int64)),
            hist_tokens_after=t(s.after.astype(np.int64)),
        )


def _persrec_config(persrec: PersrecConfig | tuple[int, int] | None) -> PersrecConfig | None:
    if persrec is None or isinstance(persrec, PersrecConfig):
        return persrec
    segment, tokens = persrec
    return PersrecConfig(tokens=tokens, segment=segment)


def pack_batch(
    samples: Samples,
    ids: np.ndarray,
    plans: tuple[BatchPlan, ...],
    tokens: TokenizedDataset,
    answer: bool = True,
    persrec: PersrecConfig | tuple[int, int] | None = None,
) -> PackedBatch:
    """Pack exactly the samples ``ids`` with the given per-view plans (``[len(ids), L]`` each); ``persrec``
    (a ``PersrecConfig``, or (segment, tokens) for the segments layout) inserts PerSRec's rows and layout
    (see ``Packer.slots``)."""
    packer = Packer(tokens, answer)
    ids = np.asarray(ids, dtype=np.int64)
    width = plans[0].kinds.shape[1]
    items, lengths = packer.history_items(samples, ids, width)
    for p in plans:
        if p.kinds.shape != (len(ids), width) or np.any((p.kinds != PAD).sum(1) != lengths):
            raise ValueError("plans must be [len(ids), L] with one non-PAD kind per history item")
    targets = samples.dataset.items[samples.target_index[ids]].astype(np.int64)
    v = len(plans)
    kinds = np.stack([p.kinds for p in plans], 1).reshape(-1, width)
    group = np.stack([p.group for p in plans], 1).reshape(-1, width)
    s = packer.slots(np.repeat(items, v, 0), BatchPlan(kinds, group), np.repeat(targets, v), persrec)
    s.sample, s.view, s.target = np.repeat(ids, v), np.tile(np.arange(v), len(ids)), np.repeat(targets, v)
    return packer.build(s)


def batch_slots(
    packer: Packer,
    samples: Samples,
    planner: Planner,
    max_rows: int | None,
    shuffle: bool,
    seed: int,
    order: np.ndarray | None,
    progress: float | None = None,
) -> Iterator[Slots]:
    """The planned slots of each token-budget batch of one pass (see ``iter_batches``), before any token
    is gathered; ``max_rows`` None: one batch of every sample in ``order`` (planned as in a pass with a
    budget: the same random stream), checked by the caller (``patchrec.train.distributed.shard_step``)."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    order_rng, plan_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if order is None:
        order = order_rng.permutation(len(samples)) if shuffle else np.arange(len(samples))
    else:
        if shuffle:
            raise ValueError("pass either order or shuffle=True, not both")
        order = np.asarray(order, dtype=np.int64)
        if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= len(samples))):
            raise ValueError(f"order must be 1-D sample indices in [0, {len(samples)})")
    if progress is not None and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    views = planner.views
    pending = None
    total = max(len(order), 1)
    for lo in range(0, len(order), PLAN_CHUNK):
        ids = order[lo : lo + PLAN_CHUNK]
        if progress is None:
            where = (lo + np.arange(len(ids))) / total
        else:
            where = np.full(len(ids), progress)
        s = packer.plan_slots(samples, ids, planner, plan_rng, where)
        s = s if pending is None else pending.concat(s)
        last = lo + PLAN_CHUNK >= len(order)
        if max_rows is None:
            pending = s
            if last:
                yield s
            continue
        cum = np.cumsum(s.check_fits(views, max_rows, samples))
        start = 0
        while start < len(cum):
            end = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + max_rows, side="right"))
            if end == len(cum) and not last:
                break  # the batch could take samples of the next chunk
            yield s.take(start * views, end * views)
            start = end
        pending = s.take(start * views, len(cum) * views)


def iter_batches(
    samples: Samples,
    planner: Planner,
    tokens: TokenizedDataset,
    max_rows: int,
    shuffle: bool = False,
    seed: int = 0,
    order: np.ndarray | None = None,
    answer: bool = True,
    progress: float | None = None,
) -> Iterator[PackedBatch]:
    """Token-budget batches over ``samples`` (one epoch): consecutive samples of the order, as many as fit in
    ``max_rows`` rows (all views of a sample count together and stay in one batch).

    ``order``: explicit sample indices to visit (e.g. a shard); otherwise ``arange`` or, with ``shuffle``, a
    permutation from ``seed``. Random plans draw from a generator seeded by ``seed`` too, so an epoch is
    reproducible. A sample that alone exceeds ``max_rows`` raises ValueError (never cut).

    ``progress``: the curriculum ``p`` of every sample of this call (training passes optimizer step / total
    steps); None = each sample's position in this pass over ``order``.
    """
    packer = Packer(tokens, answer)
    for slots in batch_slots(packer, samples, planner, max_rows, shuffle, seed, order, progress):
        yield packer.build(slots)


def history_token_counts(
    samples: Samples, planner: Planner, tokens: TokenizedDataset, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (last view): history title tokens before and after compression, without building batches."""
    packer = Packer(tokens, answer=False)
    rng = np.random.default_rng(seed)
    before = np.zeros(len(samples), dtype=np.int64)
    after = np.zeros(len(samples), dtype=np.int64)
    for lo in range(0, len(samples), PLAN_CHUNK):
        ids = np.arange(lo, min(lo + PLAN_CHUNK, len(samples)))
        s = packer.plan_slots(samples, ids, planner, rng, ids / max(len(samples), 1))
        before[ids] = s.before.reshape(len(ids), -1)[:, -1]
        after[ids] = s.after.reshape(len(ids), -1)[:, -1]
    return before, after


__all__ = ["PLAN_CHUNK", "FoldPass", "PackedBatch", "Packer", "Slots", "batch_slots", "history_token_counts",
           "iter_batches", "pack_batch"]
