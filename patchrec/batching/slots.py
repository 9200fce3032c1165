"""The slot grid of packed sequences, planned before any token is gathered (``patchrec.batching.pack``).

Each sequence is laid out as ``2L+3`` slots (head, item/separator pairs, tail, answer); every non-empty slot
is one contiguous range of the packer's token source. ``Slots`` holds the grid of Q sequences (the views of a
sample adjacent) with what the packer needs to materialise them; it travels from planning
(``Packer.plan_slots``) through token-budget batching (``pack.batch_slots``) and a training step's split over
ranks (``patchrec.train.distributed.shard_step``) to ``Packer.build``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from patchrec.batching.blocks import BlockLayout, block_layout
from patchrec.batching.persrec_layouts import PersrecConfig, old_items
from patchrec.batching.plan import PAD, TEXT
from patchrec.data.dataset import Samples

# Padding of the 2-D arrays when grids of different widths are concatenated.
FILL = {"src": 0, "ntok": 0, "run": True, "newrow": True, "block_end": False, "fold_items": -1}


@dataclass
class Slots:
    """The slots of Q sequences: ``[Q, W]`` grids and per-sequence ``[Q]`` arrays (module docstring)."""

    src: np.ndarray  # int64 [Q, W], start of each slot's range in the packer's token source
    ntok: np.ndarray  # int32 [Q, W], tokens of each slot (0: an empty slot)
    run: np.ndarray  # bool [Q, W], every token its own row (text); else the slot is one segment (a patch)
    newrow: np.ndarray  # bool [Q, W], a patch segment opens a new row (a session's later members do not)
    rows: np.ndarray  # int64 [Q], packed rows of each sequence (the rolling layout's fold passes aside)
    before: np.ndarray  # int64 [Q], history title tokens as text
    after: np.ndarray  # int64 [Q], history rows after compression (a patch or session counts once)
    sample: np.ndarray | None = None  # int64 [Q], index into the Samples
    view: np.ndarray | None = None  # int64 [Q], 0 = first view
    target: np.ndarray | None = None  # int64 [Q], the answer item
    block_end: np.ndarray | None = None  # bool [Q, W], PerSRec segments / window: slots that close a block
    # PerSRec rolling: the folded items (-1 padded, oldest first), whether they are text, their rows in the
    # fold passes, and the layout's segment N, tokens k and unroll U (the same for every sequence)
    fold_items: np.ndarray | None = None  # int64 [Q, F]
    fold_text: np.ndarray | None = None  # bool [Q]
    fold_rows: np.ndarray | None = None  # int64 [Q]
    fold_segment: np.ndarray | None = None  # int64 [Q]
    fold_tokens: np.ndarray | None = None  # int64 [Q]
    fold_unroll: np.ndarray | None = None  # int64 [Q]

    def __len__(self) -> int:
        return len(self.rows)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def slot_rows(self) -> np.ndarray:
        """``[Q, W]`` packed rows of each slot: its tokens when it runs, else one row if it opens one."""
        return np.where(self.run, self.ntok, self.newrow & (self.ntok > 0))

    def take(self, lo: int, hi: int) -> Slots:
        """Sequences ``lo:hi``."""
        return Slots(**{name: value[lo:hi] for name, value in self._arrays().items()})

    def concat(self, other: Slots) -> Slots:
        """These sequences, then ``other``'s (a narrower grid is widened with empty slots)."""
        if len(self) == 0:
            return other
        mine, theirs = self._arrays(), other._arrays()
        out = {}
        for name, y in theirs.items():
            x = mine[name]
            if x.ndim == 2 and x.shape[1] != y.shape[1]:
                width = max(x.shape[1], y.shape[1])
                x, y = _widen(x, width, name), _widen(y, width, name)
            out[name] = np.concatenate([x, y])
        return Slots(**out)

    def sample_rows(self, views: int) -> np.ndarray:
        """Rows of each sample (all its ``views`` sequences, the rolling layout's fold passes included):
        what a ``max_rows`` budget counts."""
        rows = self.rows if self.fold_rows is None else self.rows + self.fold_rows
        return rows.reshape(-1, views).sum(axis=1)

    def check_fits(self, views: int, max_rows: int, samples: Samples) -> np.ndarray:
        """``sample_rows``, or ``ValueError`` naming the first sample that alone needs more than ``max_rows``
        (a sample is never cut)."""
        sample_rows = self.sample_rows(views)
        if sample_rows.max(initial=0) > max_rows:
            bad = int(np.flatnonzero(sample_rows > max_rows)[0])
            sid = int(self.sample[bad * views])
            raise ValueError(f"sample {sid} (user {int(samples.user[sid])}) needs "
                             f"{int(sample_rows[bad])} rows > max_rows={max_rows}")  # fmt: skip
        return sample_rows

    def block_layout(self, cu: np.ndarray) -> tuple[BlockLayout, torch.Tensor]:
        """The PerSRec blocks of the sequences (row offsets ``cu``): a block ends after each ``block_end``
        slot and at the end of the sequence; the head block is carried whole, a segment block its T rows (its
        closing slot's rows but the separator)."""
        slot_rows = self.slot_rows().astype(np.int64)
        cum = np.cumsum(slot_rows, axis=1)
        seq, col = np.nonzero(self.block_end)  # sequence-major, slots in order
        q = len(cu) - 1
        ends = np.concatenate([cum[seq, col], cum[:, -1]])
        carried = np.concatenate([np.where(col == 0, slot_rows[seq, col], slot_rows[seq, col] - 1),
                                  np.zeros(q, dtype=np.int64)])  # fmt: skip
        block_seq = np.concatenate([seq, np.arange(q)])
        order = np.lexsort((ends, block_seq))
        ends, carried, block_seq = ends[order], carried[order], block_seq[order]
        first = np.r_[True, block_seq[1:] != block_seq[:-1]]
        starts = np.where(first, 0, np.r_[0, ends[:-1]])
        layout = block_layout(ends - starts, carried, block_seq, q)
        return layout, torch.from_numpy(carried.astype(np.int64))


def _widen(z: np.ndarray, width: int, name: str) -> np.ndarray:
    extra = width - z.shape[1]
    if extra == 0:
        return z
    filler = np.full((z.shape[0], extra), FILL[name], dtype=z.dtype)
    if name == "fold_items":  # not a slot grid: pad at the end
        return np.concatenate([z, filler], axis=1)
    # Slots keep their order: history slots, then the 2 tail slots (tail, answer) stay last.
    return np.concatenate([z[:, :-2], filler, z[:, -2:]], axis=1)


def split_folds(items: np.ndarray, kinds: np.ndarray, group: np.ndarray, config: PersrecConfig):
    """Rolling layout: (the fold columns ``fold_items`` / ``fold_text``, then items / kinds / group of the
    open segments only, shifted to the left). Folded items keep their plan kind (ITEM or TEXT)."""
    num, width = kinds.shape
    lengths = (kinds != PAD).sum(axis=1)
    folded = old_items(config, lengths)
    fold_width = int(folded.max(initial=0))
    cols = np.arange(fold_width)[None]
    in_fold = cols < folded[:, None]
    fold_items = np.where(in_fold, items[:, :fold_width], -1)
    fold_text = kinds[np.arange(num), 0] == TEXT
    index = np.minimum(np.arange(width)[None] + folded[:, None], max(width - 1, 0))
    valid = (np.arange(width)[None] + folded[:, None] < width) & np.take_along_axis(kinds != PAD, index, 1)
    shifted = [np.where(valid, np.take_along_axis(a, index, 1), fill) for a, fill in
               ((items, -1), (kinds, PAD), (group, -1))]  # fmt: skip
    return (fold_items, fold_text), shifted[0], shifted[1].astype(kinds.dtype), shifted[2]


__all__ = ["FILL", "Slots", "split_folds"]
