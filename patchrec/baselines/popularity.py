"""Most-popular baseline: every user gets the same scores, the items' interaction counts in the train split.

Counts every item at every position inside a user's train range (also positions < 3, which are never
targets but are interactions all the same). Validation and test interactions are never counted, so the
scores use nothing from the future of the global time split.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from patchrec.data.dataset import Dataset, Samples, gather_ragged


class Popularity:
    def __init__(self, counts: np.ndarray) -> None:
        if counts.ndim != 1 or len(counts) == 0:
            raise ValueError("counts must be a non-empty 1-D array")
        self.counts = np.asarray(counts, dtype=np.int64)
        self._scores = torch.from_numpy(self.counts.astype(np.float32))

    @classmethod
    def fit(cls, dataset: Dataset) -> Popularity:
        ranges = dataset.splits["train"]
        has = ranges[:, 0] >= 0
        starts = dataset.user_offsets[:-1][has] + ranges[has, 0]
        lengths = ranges[has, 1] - ranges[has, 0] + 1
        items = gather_ragged(dataset.items.astype(np.int64), starts, lengths)
        return cls(np.bincount(items, minlength=dataset.num_items))

    @property
    def num_items(self) -> int:
        return len(self.counts)

    def scorer(self, samples: Samples) -> Callable[[np.ndarray], torch.Tensor]:
        """``score_fn`` for ``patchrec.eval.metrics.rank_samples``: the same count row for every sample."""
        if samples.dataset.num_items != self.num_items:
            raise ValueError(
                f"samples' catalog has {samples.dataset.num_items} items, the model {self.num_items}"
            )
        return lambda index: self._scores.expand(len(index), -1)
