"""The work behind the HTTP API, run by the server's one worker thread on a batch of requests at a time: store
events, recommend for stored users and inline histories, keep PerSRec states up to date.

Every method takes the requests of one batch and returns one outcome per request, a result or the exception
that request fails with, so that one bad request never fails the others: when the batched model call raises,
the requests are scored again one by one and only the one that fails alone gets its error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from patchrec.serve.scorers import Query, Scorer
from patchrec.serve.storage import Ack, EventWrite, StateRow, Storage

log = logging.getLogger("patchrec.serve")


class UnknownUser(LookupError):
    """A user id with no stored interactions."""

    def __init__(self, user: str) -> None:
        super().__init__(f"unknown user {user!r} (post events for it first)")
        self.user = user


class ModelError(RuntimeError):
    """The model failed on this request (alone: not because of another request in its batch)."""


@dataclass(frozen=True)
class RecommendRequest:
    users: tuple[str, ...] | None  # stored users, or
    history: tuple[int, ...] | None  # an inline history (oldest first), nothing stored
    k: int
    exclude_seen: bool


@dataclass
class Recommendation:
    user: str | None
    items: list[int]
    scores: list[float]


def top_k(scores: torch.Tensor, k: int, exclude: np.ndarray | None) -> tuple[list[int], list[float]]:
    """The ``k`` best items (fewer when fewer have a finite score), best first; equal scores in item order
    (a stable sort), so that the same scores always give the same list."""
    scores = scores.clone()
    if exclude is not None and len(exclude):
        scores[torch.from_numpy(np.unique(exclude))] = -torch.inf
    order = torch.sort(scores, descending=True, stable=True).indices
    take = min(k, int(torch.isfinite(scores).sum()))
    best = order[:take]
    return best.tolist(), scores[best].tolist()


class Service:
    def __init__(self, scorer: Scorer, storage: Storage) -> None:
        self.scorer = scorer
        self.storage = storage
        self.state_failures = 0  # maintenance runs that failed (states are rebuilt on the next request)

    # --- events ---

    def append(self, writes: list[EventWrite]) -> list[Ack | Exception]:
        """Store every write in one transaction (committed on return)."""
        return self.storage.append(writes)

    def maintain(self, users: list[str]) -> None:
        """Bring the PerSRec states of ``users`` up to date with their interactions and store them (called
        after their events are acknowledged; a failure is logged: the next request rebuilds the state)."""
        if not self.scorer.stateful or not users:
            return
        try:
            self._store_states(users, self.scorer.maintain(self._queries(users)))
        except Exception:
            if len(users) == 1:
                self.state_failures += 1
                log.exception("updating the PerSRec state of user %r failed", users[0])
                return
            for user in users:  # one failing user must not keep the others' states behind
                self.maintain([user])

    def _queries(self, users: list[str]) -> list[Query]:
        histories = self.storage.histories(users)
        missing = [u for u in users if u not in histories]
        if missing:
            raise UnknownUser(missing[0])
        stored = self.storage.states(users) if self.scorer.stateful else {}
        return [Query(histories[u], stored.get(u)) for u in users]

    def _store_states(self, users: list[str], rows: list[StateRow | None]) -> None:
        changed = {u: r for u, r in zip(users, rows, strict=True) if r is not None}
        self.storage.save_states(changed)

    # --- recommendations ---

    def recommend(self, requests: list[RecommendRequest]) -> list[list[Recommendation] | Exception]:
        """Every request's recommendations, all users of the batch scored in one ``Scorer.score`` call."""
        try:
            return self._recommend(requests)
        except Exception as err:
            if len(requests) == 1:
                if not isinstance(err, (UnknownUser, ModelError)):
                    log.exception("recommendation failed")
                    err = ModelError(f"the model failed on this request: {type(err).__name__}: {err}")
                return [err]
        return [self.recommend([r])[0] for r in requests]

    def _recommend(self, requests: list[RecommendRequest]) -> list[list[Recommendation]]:
        users = list(dict.fromkeys(u for r in requests if r.users for u in r.users))
        queries = self._queries(users) if users else []
        inline = [r for r in requests if r.history is not None]
        queries += [Query(np.asarray(r.history, dtype=np.int64)) for r in inline]
        scored = self.scorer.score(queries)
        if users:
            try:
                self._store_states(users, [s.state for s in scored[: len(users)]])
            except Exception:  # the scores stand; the state is rebuilt next time
                self.state_failures += 1
                log.exception("storing PerSRec states failed")
        by_user = dict(zip(users, zip(queries, scored, strict=False), strict=False))
        inline_results = iter(zip(queries[len(users) :], scored[len(users) :], strict=True))
        out = []
        for r in requests:
            pairs = [(u, *by_user[u]) for u in r.users] if r.users else [(None, *next(inline_results))]
            results = []
            for user, query, result in pairs:
                items, scores = top_k(result.scores, r.k, query.history if r.exclude_seen else None)
                results.append(Recommendation(user, items, scores))
            out.append(results)
        return out


__all__ = ["ModelError", "RecommendRequest", "Recommendation", "Service", "UnknownUser", "top_k"]
