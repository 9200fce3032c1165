"""PerSRec's window layout (the paper's) on a served LLM: each user's state is stored and refolded every m
interactions (``patchrec serve`` with a ``persrec`` run of ``--persrec-layout window``; used by
``patchrec.serve.llm.LLMScorer``).

The state is what ``patchrec.persrec.llm.split_state`` gives for the user's window-layout prompt (the newest
P + R items): every layer's keys/values of the prompt prefix rows (up to ``<|start_seq|>``) and of the k T
rows that close the old window, so prefix + k rows whatever the history length, and the row where the recent
block starts (``next_position``). It is stored as safetensors bytes (``patchrec.persrec.stored``) with the
model's fingerprint, the range of the history its old window covers, that range's hash and the history
length it was built at (``built_at``). It is rebuilt when missing, unreadable, made by another model, not
matching the user's items, or ``refold_every`` or more interactions old.

In between, a request reads the user's current recent block (the newest min(n, R) items) against the stale
state, its rows continuing the state's row numbering, as ``CachedUser(refold_every=m)`` does on the ID
models (``patchrec.persrec.staleness``): the scores are those of the window-layout prompt made of the old
window as it was at the last refold followed by the current recent block. Items that left the recent block
since then are in neither until the next refold. With m = 1 this is exactly ``patchrec eval``'s forward.
"""

from __future__ import annotations

import numpy as np

from patchrec.batching.pack import iter_batches
from patchrec.batching.persrec_layouts import window_split
from patchrec.batching.plan import Planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Dataset, history_samples
from patchrec.persrec.llm import split_state
from patchrec.persrec.state import PersrecState
from patchrec.persrec.stored import split_states, state_from_bytes, state_to_bytes
from patchrec.serve.scorers import Query
from patchrec.serve.storage import StateRow, items_hash


class WindowStates:
    """Stored window-layout states of served LLM users (module docstring)."""

    def __init__(self, model, tokens: TokenizedDataset, dataset: Dataset, planner: Planner, fingerprint: str,
                 *, refold_every: int, max_rows: int) -> None:  # fmt: skip
        config = planner.persrec
        if config is None or config.layout != "window":
            raise ValueError("WindowStates needs the persrec plan with --persrec-layout window")
        if refold_every < 1:
            raise ValueError(f"refold_every must be >= 1, got {refold_every}")
        self.model, self.tokens, self.dataset, self.planner = model, tokens, dataset, planner
        self.config, self.fingerprint = config, fingerprint
        self.refold_every, self.max_rows = refold_every, max_rows
        self.read = config.window + config.recent  # the newest P + R items make a prompt

    def span(self, history: np.ndarray) -> tuple[int, int]:
        """[start, end) of the history's old window now (start: the first of the newest P + R items)."""
        n = len(history)
        start = max(0, n - self.read)
        old, _ = window_split(np.array([max(n - start, 1)]), self.config)
        return start, start + int(old[0])

    def recent(self, history: np.ndarray) -> np.ndarray:
        """The newest min(n, R) items: the block a request reads against the state."""
        return history[len(history) - min(len(history), self.config.recent) :]

    def usable(self, history: np.ndarray, row: StateRow | None) -> bool:
        """Whether a stored state may be read for ``history``: this model's, built from these items, and
        fewer than ``refold_every`` interactions old."""
        n = len(history)
        return (
            row is not None and row.fingerprint == self.fingerprint and 0 <= row.start <= row.end <= n
            and row.built_at <= n and n - row.built_at < self.refold_every
            and row.items_hash == items_hash(history[row.start : row.end])
        )  # fmt: skip

    def build(self, histories: list[np.ndarray]) -> list[PersrecState]:
        """One-user states of the histories' current windows (their old blocks run, batched by rows)."""
        device = next(self.model.parameters()).device
        prompts = [h[len(h) - min(len(h), self.read) :] for h in histories]
        out: list[PersrecState | None] = [None] * len(histories)
        samples = history_samples(self.dataset, prompts)
        for batch in iter_batches(samples, self.planner, self.tokens, self.max_rows, answer=False):
            state, *_ = split_state(self.model, batch.to(device))
            for sid, one in zip(batch.sample_ids.tolist(), split_states(state), strict=True):
                out[sid] = one
        return out

    def states(self, queries: list[Query], *, load: bool = True) -> tuple[list, list[StateRow | None]]:
        """Each query's state (one-user states; None where kept and ``load`` is False) and the rows to store
        for those rebuilt."""
        device = next(self.model.parameters()).device
        states: list[PersrecState | None] = [None] * len(queries)
        rebuild = []
        for i, q in enumerate(queries):
            if not self.usable(q.history, q.stored):
                rebuild.append(i)
            elif load:
                try:
                    states[i] = state_from_bytes(q.stored.data, device)
                except ValueError:  # unreadable bytes: rebuilt from the interactions, never served
                    rebuild.append(i)
        changed: list[StateRow | None] = [None] * len(queries)
        if not rebuild:
            return states, changed
        built = self.build([queries[i].history for i in rebuild])
        for i, state in zip(rebuild, built, strict=True):
            history = queries[i].history
            start, end = self.span(history)
            states[i] = state
            changed[i] = StateRow(self.fingerprint, start, end, len(history), items_hash(history[start:end]),
                                  int(state.nbytes()[0]), state_to_bytes(state))  # fmt: skip
        return states, changed


__all__ = ["WindowStates"]
