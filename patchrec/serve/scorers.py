"""Scoring batches of users for ``patchrec serve``: one ``Scorer`` per kind of model, each scoring many
histories in one packed, padding-free forward.

- ``PopularityScorer``: the training counts, the same row for everyone.
- ``SequenceScorer``: SASRec / HSTU / GRU4Rec without PerSRec: the latest L items of every history packed
  back to back (``score_last``), exactly as ``patchrec baseline`` evaluates.
- ``PersrecScorer``: SASRec / HSTU with PerSRec tokens, any layout, from each user's stored state
  (``patchrec.persrec``): states missing, made by another model or not matching the history are built from
  the history; states behind the history are brought up to date (``segments`` and ``rolling``: whole new
  segments folded into them; ``window``: rebuilt every ``refold_every`` interactions, read stale in
  between); then every user's recent items are read against the concatenated states in one forward.

A ``Query`` is one user's whole history (oldest first) and their stored state, if any; ``score`` returns per
query the catalog's scores and the state to store when it changed. Every computation is per user (packed
sequences never see each other), so a batch gives each user the scores they get alone (tested to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from patchrec.baselines.train import cu_seqlens_of, score_last
from patchrec.persrec.rolling import rolling_fold
from patchrec.persrec.sequence import build_state, fold_segments, read_recent, split_for
from patchrec.persrec.stored import concat_states, split_states, state_from_bytes, state_to_bytes
from patchrec.persrec.window import window_split
from patchrec.serve.config import DEFAULT_REFOLD_EVERY
from patchrec.serve.storage import StateRow, items_hash


@dataclass
class Query:
    history: np.ndarray  # int64 [n], the user's items oldest first (n >= 1)
    stored: StateRow | None = None  # the user's stored PerSRec state, if any


@dataclass
class Scored:
    scores: torch.Tensor  # fp32 [num_items] on CPU; -inf = never recommended (e.g. an LLM's duplicate title)
    state: StateRow | None = None  # a new state to store for this user (None: unchanged or stateless)


class Scorer(Protocol):
    kind: str  # "popularity", "sasrec", "hstu", "gru4rec", "llm"
    num_items: int
    fingerprint: str  # the model's identity (weights + config): stored states carry it
    stateful: bool  # keeps per-user PerSRec states in the storage
    titles: list[str] | None  # item titles when the model knows them (the LLM)

    def rows(self, length: int) -> int:
        """Rows a history of ``length`` items costs in a batch (for the batcher's row budget)."""
        ...

    def score(self, queries: list[Query]) -> list[Scored]: ...

    def maintain(self, queries: list[Query]) -> list[StateRow | None]:
        """States brought up to date after new interactions (stateful scorers; None = nothing to store)."""
        ...

    def describe(self) -> dict: ...


def _device(model) -> torch.device:
    return next(model.parameters()).device


class PopularityScorer:
    kind = "popularity"
    stateful = False
    titles = None

    def __init__(self, model, fingerprint: str) -> None:
        self.scores = torch.as_tensor(np.asarray(model.counts), dtype=torch.float32)
        self.num_items = len(self.scores)
        self.fingerprint = fingerprint

    def rows(self, length: int) -> int:
        return 1

    def score(self, queries: list[Query]) -> list[Scored]:
        return [Scored(self.scores.clone()) for _ in queries]

    def maintain(self, queries: list[Query]) -> list[StateRow | None]:
        return [None] * len(queries)

    def describe(self) -> dict:
        return {"kind": self.kind, "num_items": self.num_items, "history_items": 0}


class SequenceScorer:
    """An ID sequence model without PerSRec: the latest ``history_items`` items of each user, one forward."""

    stateful = False
    titles = None

    def __init__(self, kind: str, model, history_items: int, fingerprint: str) -> None:
        self.kind, self.model, self.fingerprint = kind, model.eval(), fingerprint
        self.num_items = model.num_items
        self.history_items = history_items

    def rows(self, length: int) -> int:
        return min(length, self.history_items)

    def score(self, queries: list[Query]) -> list[Scored]:
        read = [q.history[-self.history_items :] for q in queries]
        lengths = np.array([len(r) for r in read], dtype=np.int64)
        items = torch.from_numpy(np.concatenate(read)).to(_device(self.model))
        with torch.inference_mode():
            scores = score_last(self.model, items, cu_seqlens_of(lengths).to(items.device)).float().cpu()
        return [Scored(row) for row in scores]

    def maintain(self, queries: list[Query]) -> list[StateRow | None]:
        return [None] * len(queries)

    def describe(self) -> dict:
        return {"kind": self.kind, "num_items": self.num_items, "history_items": self.history_items}


@dataclass
class _Plan:
    """What a query's state needs: ``keep`` the stored one, ``fold`` items [from_, end) into it, or ``build``
    it from items [start, end)."""

    action: str
    start: int
    end: int


class PersrecScorer:
    """SASRec / HSTU with PerSRec tokens, served from stored per-user states (module docstring)."""

    stateful = True
    titles = None

    def __init__(self, kind: str, model, fingerprint: str, *,
                 refold_every: int = DEFAULT_REFOLD_EVERY) -> None:  # fmt: skip
        if refold_every < 1:
            raise ValueError(f"refold_every must be >= 1, got {refold_every}")
        self.kind, self.model, self.fingerprint = kind, model.eval(), fingerprint
        self.config = model.persrec
        self.num_items = model.num_items
        self.refold_every = refold_every
        # items of history read: L (segments), P + R (window), or every item (rolling: None)
        self.history_items = self.config.history_items(model.config.max_len)
        self.device = _device(model)

    def rows(self, length: int) -> int:
        n = length if self.history_items is None else min(length, self.history_items)
        # the recent items read against the state, at most one segment (or R) of them
        _, recent = self._split(max(n, 1))
        return int(recent)

    def _split(self, n: int) -> tuple[int, int]:
        old, recent = split_for(self.config, np.array([n]))
        return int(old[0]), int(recent[0])

    def _usable(self, history: np.ndarray, row: StateRow | None) -> bool:
        n = len(history)
        return (
            row is not None and row.fingerprint == self.fingerprint and 0 <= row.start <= row.end <= n
            and row.built_at <= n and row.items_hash == items_hash(history[row.start : row.end])
        )  # fmt: skip

    def _plan(self, query: Query) -> _Plan:
        n = len(query.history)
        start = 0 if self.history_items is None else max(0, n - self.history_items)
        old, _ = self._split(n - start)
        end = start + old
        row = query.stored
        if not self._usable(query.history, row):
            return _Plan("build", start, end)
        if self.config.layout == "window":
            # the window slides with every interaction: rebuilt every refold_every interactions, read stale
            # in between (what CachedUser(refold_every=m) does)
            if n - row.built_at >= self.refold_every:
                return _Plan("build", start, end)
            return _Plan("keep", row.start, row.end)
        if row.start != start or row.end > end:
            return _Plan("build", start, end)  # segments past L items: the segments moved with the history
        return _Plan("keep" if row.end == end else "fold", row.start, end)

    def _states(self, queries: list[Query]) -> tuple[list, list[StateRow | None]]:
        """Each query's up-to-date state (one-user states) and the rows to store for those that changed."""
        plans = [self._plan(q) for q in queries]
        states: list = [None] * len(queries)
        changed: list[StateRow | None] = [None] * len(queries)
        build = [i for i, p in enumerate(plans) if p.action == "build"]
        fold = [i for i, p in enumerate(plans) if p.action == "fold"]
        for i, p in enumerate(plans):
            if p.action != "build":
                states[i] = state_from_bytes(queries[i].stored.data, self.device)
        with torch.inference_mode():
            if build:
                spans = [queries[i].history[plans[i].start : plans[i].end] for i in build]
                items = torch.from_numpy(np.concatenate(spans)).to(self.device)
                built = build_state(self.model, items, np.array([len(s) for s in spans], dtype=np.int64))
                for i, state in zip(build, split_states(built), strict=True):
                    states[i] = state
            if fold:
                spans = [queries[i].history[queries[i].stored.end : plans[i].end] for i in fold]
                items = torch.from_numpy(np.concatenate(spans)).to(self.device)
                lengths = np.array([len(s) for s in spans], dtype=np.int64)
                batched = concat_states([states[i] for i in fold])
                folder = rolling_fold if self.config.layout == "rolling" else fold_segments
                folded = split_states(folder(self.model, batched, items, lengths))
                for i, state in zip(fold, folded, strict=True):
                    states[i] = state
        for i in build + fold:
            q, p = queries[i], plans[i]
            built_at = len(q.history) if p.action == "build" else q.stored.built_at
            digest = items_hash(q.history[p.start : p.end])
            size = int(states[i].nbytes()[0])
            changed[i] = StateRow(self.fingerprint, p.start, p.end, built_at, digest, size,
                                  state_to_bytes(states[i]))  # fmt: skip
        return states, changed

    def _recent(self, query: Query, row_end: int) -> np.ndarray:
        if self.config.layout == "window":
            n = len(query.history)
            _, recent = window_split(np.array([min(n, self.history_items)]), self.config)
            return query.history[n - int(recent[0]) :]
        return query.history[row_end:]

    def score(self, queries: list[Query]) -> list[Scored]:
        states, changed = self._states(queries)
        ends = [c.end if c is not None else q.stored.end for q, c in zip(queries, changed, strict=True)]
        recent = [self._recent(q, e) for q, e in zip(queries, ends, strict=True)]
        items = torch.from_numpy(np.concatenate(recent)).to(self.device)
        lengths = np.array([len(r) for r in recent], dtype=np.int64)
        with torch.inference_mode():
            hidden = read_recent(self.model, concat_states(states), items, lengths)
            scores = self.model.logits(hidden).float().cpu()
        return [Scored(s, c) for s, c in zip(scores, changed, strict=True)]

    def maintain(self, queries: list[Query]) -> list[StateRow | None]:
        _, changed = self._states(queries)
        return changed

    def describe(self) -> dict:
        c = self.config
        out = {"kind": self.kind, "num_items": self.num_items, "history_items": self.history_items,
               "persrec": {"layout": c.layout, "tokens": c.tokens, "segment": c.segment}}  # fmt: skip
        if c.layout == "window":
            out["persrec"].update(window=c.window, recent=c.recent, refold_every=self.refold_every)
        return out


def warm_up(scorer: Scorer) -> None:
    """Score one tiny history (nothing stored): the first forward of a process pays for lazy initialisation
    (seconds on a CPU), which would otherwise land on the first request."""
    scorer.score([Query(np.zeros(1, dtype=np.int64))])


__all__ = ["PersrecScorer", "PopularityScorer", "Query", "Scored", "Scorer", "SequenceScorer", "warm_up"]
