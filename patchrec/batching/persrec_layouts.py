"""PerSRec's options (how many tokens, which of three layouts) and each layout's split of a history into
the old part that builds the per-user state and the recent part read against it. Shared by the ID models
(SASRec, HSTU) and the LLM ``persrec`` plan.

- ``segments``: the latest L items cut into full segments of ``segment`` items from the oldest, each followed
  by its k T tokens, then the newest 1..segment items. Every T row stays visible to the later rows, so the
  cached state grows by k rows per segment (``patchrec.persrec.layout``).
- ``window`` (the PerSRec paper's released setup): one old window of up to ``window`` (P) items compressed to
  k T tokens, then the ``recent`` (R) newest items; the state is exactly k rows per layer, but the window
  slides with every interaction, so the state is rebuilt ("refolded") now and then
  (``patchrec.persrec.window``).
- ``rolling`` (bounded state for unbounded histories): segments of ``segment`` items fixed on the user's own
  timeline from their first interaction; each segment reads the previous segment's memory (k vectors) and
  writes a new one through its k T tokens; the newest 1..segment items read the memory. The state is k
  vectors whatever the history length (``patchrec.persrec.rolling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUTS = ("segments", "window", "rolling")


@dataclass(frozen=True)
class PersrecConfig:
    tokens: int = 0  # k learnable personalization tokens (0 = PerSRec off; the released configs: 4)
    segment: int = 50  # segments / rolling: items per segment
    layout: str = "segments"  # one of LAYOUTS (module docstring)
    window: int = 0  # window: P, old items compressed into the k tokens (the paper: 400 / 1024)
    recent: int = 0  # window: R, newest items read as they are (the paper: 100 / 256)
    # rolling, training only: the gradient reaches back through at most this many segments (the memory
    # is detached every ``unroll`` segments; 0 = never detached). Forward values do not depend on it.
    unroll: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"persrec tokens must be >= 0, got {self.tokens}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"persrec layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not self.tokens:
            return
        if self.layout in ("segments", "rolling") and self.segment < 1:
            raise ValueError(f"persrec segment must be >= 1, got {self.segment}")
        if self.layout == "window" and (self.window < 1 or self.recent < 1):
            raise ValueError(
                "the window layout needs persrec window >= 1 and recent >= 1, "
                f"got {self.window} / {self.recent}"
            )
        if self.unroll < 0:
            raise ValueError(f"persrec unroll must be >= 0, got {self.unroll}")

    @property
    def on(self) -> bool:
        return self.tokens > 0

    def history_items(self, max_len: int) -> int | None:
        """Items of history the model reads: ``max_len`` (segments), P + R (window), or None (rolling: the
        whole timeline)."""
        if self.on and self.layout == "window":
            return self.window + self.recent
        if self.on and self.layout == "rolling":
            return None
        return max_len

    def rows_for(self, items: int) -> int:
        """Rows of the position table: the longest row sequence the layout makes from ``items`` history items
        (segments), P + k + R (window), or k memory + N items + k tokens (rolling)."""
        if not self.tokens:
            return items
        if self.layout == "window":
            return self.window + self.tokens + self.recent
        if self.layout == "rolling":
            return 2 * self.tokens + self.segment
        segments = (max(items, 1) - 1) // self.segment
        return items + self.tokens * int(np.int64(segments))


def num_segments(lengths: np.ndarray, segment: int) -> np.ndarray:
    """Old-history segments of a history of ``n`` items: full segments of ``segment`` items from the oldest,
    leaving 1..segment recent items (the newest item always answers, so the final block is never empty)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    if np.any(lengths < 1):
        raise ValueError("every history needs >= 1 item")
    return (lengths - 1) // segment


def window_split(lengths: np.ndarray, config: PersrecConfig) -> tuple[np.ndarray, np.ndarray]:
    """(old, recent) item counts of histories of ``lengths`` items under the window rule: the newest
    min(n, R) are recent, the items before them (at most P) the old window; ValueError when a history is
    longer than P + R (the caller keeps the newest P + R)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if np.any(lengths < 1):
        raise ValueError("every history needs >= 1 item")
    if np.any(lengths > config.window + config.recent):
        raise ValueError(
            f"a history has {int(lengths.max())} items, more than persrec window + recent "
            f"({config.window} + {config.recent}): keep the newest {config.window + config.recent}"
        )
    recent = np.minimum(lengths, config.recent)
    return lengths - recent, recent


def old_items(config: PersrecConfig, lengths: np.ndarray) -> np.ndarray:
    """Items of each history that go into the state (0 for an empty history): whole segments (segments,
    rolling) or the old window (window)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    safe = np.maximum(lengths, 1)
    if config.layout == "window":
        old = window_split(safe, config)[0]
    else:
        old = num_segments(safe, config.segment) * config.segment
    return np.where(lengths > 0, old, 0)
