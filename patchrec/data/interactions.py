"""Interaction logs -> ``Dataset``: user rows, per-user time order and the global 96/2/2 timestamp split
(docs/method.md §4). Shared by the raw MovieLens loader and the synthetic generator; the tie conventions are
documented in ``patchrec.data.movielens``.
"""

from __future__ import annotations

import numpy as np

from patchrec.data.dataset import SPLITS, Dataset

SPLIT_FRACTIONS = (48, 49, 50)  # cumulative train / train+val / all, out of 50 (96% / 2% / 2%)


def global_time_split(timestamps: np.ndarray) -> np.ndarray:
    """Split label (0 train, 1 val, 2 test) per interaction: the 96 / 2 / 2 timestamp cut of the module
    docstring (ties at a boundary go to the earlier split)."""
    n = len(timestamps)
    ordered = np.sort(timestamps, kind="stable")
    labels = np.zeros(n, dtype=np.int64)
    for label, cut in ((1, n * SPLIT_FRACTIONS[0] // 50), (2, n * SPLIT_FRACTIONS[1] // 50)):
        if cut == 0:
            labels[:] = np.maximum(labels, label)  # nothing before the cut: everything is later
            continue
        labels[timestamps > ordered[cut - 1]] = label
    return labels


def build_dataset(
    name: str,
    titles: list[str],
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    system_prompt: str,
    user_prompt: str,
) -> Dataset:
    """Interactions (already filtered) -> ``Dataset``: users in order of first appearance, items ordered by
    (timestamp, item id), the global 96/2/2 timestamp split. ``items`` are dataset item ids."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    timestamps = np.asarray(timestamps, dtype=np.int64)
    if not (len(users) == len(items) == len(timestamps)):
        raise ValueError("users, items and timestamps must have the same length")
    if len(items) and (items.min() < 0 or items.max() >= len(titles)):
        raise ValueError(f"items must be ids in [0, {len(titles)})")
    unique_users, first, user_row = np.unique(users, return_index=True, return_inverse=True)
    # row of each user = rank of its first appearance
    row_of_unique = np.empty(len(unique_users), dtype=np.int64)
    row_of_unique[np.argsort(first, kind="stable")] = np.arange(len(unique_users))
    row = row_of_unique[user_row.reshape(-1)]
    labels = global_time_split(timestamps)
    order = np.lexsort((items, timestamps, row))
    counts = np.bincount(row, minlength=len(unique_users))
    offsets = np.zeros(len(unique_users) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    sorted_row, sorted_labels = row[order], labels[order]
    # Labels are non-decreasing within a user (time order), so each split is one contiguous run.
    per_split = np.zeros((len(unique_users), len(SPLITS)), dtype=np.int64)
    np.add.at(per_split, (sorted_row, sorted_labels), 1)
    splits = {}
    starts = np.cumsum(per_split, axis=1) - per_split
    for k, split in enumerate(SPLITS):
        has = per_split[:, k] > 0
        ranges = np.full((len(unique_users), 2), -1, dtype=np.int64)
        ranges[has, 0] = starts[has, k]
        ranges[has, 1] = starts[has, k] + per_split[has, k] - 1
        splits[split] = ranges
    dataset = Dataset(
        name=name,
        titles=list(titles),
        items=items[order].astype(np.int32),
        user_offsets=offsets,
        user_ids=np.arange(len(unique_users), dtype=np.int64),
        splits=splits,
        system_prompt=system_prompt,
        user_prompt=user_prompt,
    )
    dataset.check()
    return dataset
