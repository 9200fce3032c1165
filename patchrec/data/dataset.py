"""In-memory dataset and sample index: flat numpy arrays, no per-user or per-sample Python objects.

Every loader (release format, raw MovieLens, synthetic) produces a ``Dataset``; training and evaluation read
``Samples`` made from it (docs/method.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val", "test")
HISTORY_PLACEHOLDER = "[HISTORY_SEQUENCE]"


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """``0..n-1`` for every run of length ``n`` in ``lengths``, concatenated (int64): the position of each
    element inside its run, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def gather_ragged(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``flat[starts[i] : starts[i] + lengths[i]]`` over i, without a Python loop."""
    return flat[np.repeat(starts, lengths) + ragged_arange(lengths)]


@dataclass
class Dataset:
    """A catalog, every user's time-ordered items, and each user's split ranges.

    ``items[user_offsets[u]:user_offsets[u+1]]`` are user ``u``'s item ids in time order;
    ``splits[name][u] = (s, e)`` is the inclusive range of positions (into that user's items) in the split,
    ``(-1, -1)`` when the user has none there.
    """

    name: str
    titles: list[str]  # index = item id
    items: np.ndarray  # int32 [N], all users concatenated
    user_offsets: np.ndarray  # int64 [U+1]
    user_ids: np.ndarray  # int64 [U], the "user" field of the release
    splits: dict[str, np.ndarray]  # name -> int64 [U, 2]
    system_prompt: str
    user_prompt: str  # contains HISTORY_PLACEHOLDER exactly once

    @property
    def num_users(self) -> int:
        return len(self.user_offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def user_items(self, u: int) -> np.ndarray:
        return self.items[self.user_offsets[u] : self.user_offsets[u + 1]]

    def check(self) -> None:
        """Structural invariants of the arrays (the loaders check the files line by line)."""
        if self.user_prompt.count(HISTORY_PLACEHOLDER) != 1:
            raise ValueError(f"user_prompt must contain {HISTORY_PLACEHOLDER} exactly once")
        offsets = self.user_offsets
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(self.items):
            raise ValueError("user_offsets must start at 0 and end at len(items)")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("user_offsets must be non-decreasing")
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= self.num_items):
            raise ValueError(f"items must be ids in [0, {self.num_items})")
        lengths = np.diff(offsets)
        for name in SPLITS:
            ranges = self.splits[name]
            if ranges.shape != (self.num_users, 2):
                raise ValueError(f"splits[{name!r}] must have shape [{self.num_users}, 2]")
            has = ranges[:, 0] >= 0
            bad = has & ((ranges[:, 1] < ranges[:, 0]) | (ranges[:, 1] >= lengths))
            if np.any(bad):
                u = int(np.flatnonzero(bad)[0])
                raise ValueError(f"splits[{name!r}] range {ranges[u].tolist()} of user {u} is out of bounds")


@dataclass
class Samples:
    """The samples of one split: for target position ``idx >= 3`` of a user, history = the latest
    ``max_items`` items before it (docs/method.md §4).

    Stored as absolute indices into ``dataset.items``: history of sample ``i`` is
    ``items[hist_start[i]:target_index[i]]`` and its target ``items[target_index[i]]``.
    """

    dataset: Dataset
    split: str
    max_items: int
    user: np.ndarray  # int32 [S], user row
    hist_start: np.ndarray  # int64 [S]
    target_index: np.ndarray  # int64 [S]
    _lengths: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.target_index)

    @property
    def history_lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.target_index - self.hist_start
        return self._lengths

    def select(self, index: np.ndarray | slice) -> Samples:
        """The samples ``index`` (indices or a slice), as a view on the same dataset."""
        return Samples(
            self.dataset, self.split, self.max_items, self.user[index], self.hist_start[index],
            self.target_index[index],
        )  # fmt: skip

    def history(self, i: int) -> np.ndarray:
        return self.dataset.items[self.hist_start[i] : self.target_index[i]]

    def target(self, i: int) -> int:
        return int(self.dataset.items[self.target_index[i]])

    def targets(self) -> np.ndarray:
        return self.dataset.items[self.target_index]


def make_samples(dataset: Dataset, split: str, max_items: int = 100, min_position: int = 3) -> Samples:
    """Vectorised sample index of ``split`` (no per-sample Python objects)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    ranges = dataset.splits[split]
    start = np.maximum(ranges[:, 0], min_position)
    counts = np.where(ranges[:, 0] >= 0, np.maximum(ranges[:, 1] - start + 1, 0), 0)
    users = np.repeat(np.arange(dataset.num_users, dtype=np.int32), counts)
    position = np.repeat(start, counts) + ragged_arange(counts)
    user_base = dataset.user_offsets[:-1][users]
    target_index = user_base + position
    hist_start = user_base + np.maximum(position - max_items, 0)
    return Samples(
        dataset, split, max_items, users, hist_start.astype(np.int64), target_index.astype(np.int64)
    )


def history_samples(dataset: Dataset, histories: Sequence[np.ndarray], targets: Sequence[int] | None = None):
    """Samples whose histories are given directly (item ids, oldest first; e.g. users served online),
    over ``dataset``'s catalog and prompts: one user per history, its whole history read. ``targets``
    (default item 0) matter only where an answer is packed."""
    if targets is None:
        targets = [0] * len(histories)
    if len(targets) != len(histories):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
    seqs = [np.append(np.asarray(h, dtype=np.int64), int(t)) for h, t in zip(histories, targets, strict=True)]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if np.any(lengths < 2):
        raise ValueError("every history needs >= 1 item")
    items = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    if len(items) and (items.min() < 0 or items.max() >= dataset.num_items):
        raise ValueError(f"history items must be ids in [0, {dataset.num_items})")
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    none = np.full((len(seqs), 2), -1, dtype=np.int64)
    test = np.stack([lengths - 1, lengths - 1], 1)
    online = Dataset(dataset.name, dataset.titles, items.astype(np.int32), offsets,
                     np.arange(len(seqs), dtype=np.int64), {"train": none, "val": none.copy(), "test": test},
                     dataset.system_prompt, dataset.user_prompt)  # fmt: skip
    return Samples(online, "test", int(lengths.max(initial=1)), np.arange(len(seqs), dtype=np.int32),
                   offsets[:-1].copy(), offsets[1:] - 1)  # fmt: skip
