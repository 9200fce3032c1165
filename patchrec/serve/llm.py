"""The one place ``patchrec serve`` reaches the LLM stack: loading a trained LLM run and scoring a batch of
histories through the public entry points of ``patchrec.eval`` (``exact_item_scores`` for exact ranking,
``iter_batches`` + ``beam_search`` for beam ranking), so that a change of the decoder path behind them
changes nothing here.

A batch of histories becomes a ``Samples`` view over a small in-memory ``Dataset`` that holds the
histories back to back (each followed by a placeholder target, item 0, which the prompt never shows and
which leaves every score unchanged: item 0 is the lowest id of its title, so it is that title's scored
copy anyway). Plans and settings are the run's (``patchrec eval``'s resolution, done by the command).

The ``persrec`` plan's rolling layout keeps each user's memory (k vectors of the model's width) in the
storage, like the ID models' states: a new interaction folds every segment it completes into the stored
memory (one fold pass per segment, ``Packer.fold_pass`` / ``PackedDecoder.fold_pass``, batched over users),
and a request reads only the open segment's prompt with the memory written into its memory rows
(``exact_item_scores(..., memory=)``, or ``PackedBatch.memory`` for beam search). A stored memory made by
another model, or not matching the user's items, is rebuilt from the history.

The window layout (the paper's) keeps each user's state too (``patchrec.serve.llm_window``): the prompt
prefix's and the k T rows' keys/values per layer, stored with the history length it was built at and
refolded (rebuilt from the newest P + R items) once ``refold_every`` interactions have arrived since; a
request reads only the user's current recent block (the newest R items) against the stored state
(``exact_item_scores(..., state=)``, ``beam_search(..., state=)``), stale in between as
``CachedUser(refold_every=m)`` is on the ID models. The segments layout runs with ``persrec_cache="on"``
and its state rebuilt per request: past L items its segments move with the history (every interaction
shifts which items open each segment), so a stored state would be stale at every request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from patchrec.batching.pack import Packer, iter_batches
from patchrec.batching.persrec_layouts import num_segments
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import Samples
from patchrec.data.source import load_data
from patchrec.eval.beam import TitleTrie, beam_search, get_protocol
from patchrec.eval.evaluate import exact_item_scores
from patchrec.eval.exact import CatalogTitles
from patchrec.model.lora import load_model
from patchrec.persrec.stored import concat_states
from patchrec.serve.config import DEFAULT_REFOLD_EVERY
from patchrec.serve.llm_window import WindowStates
from patchrec.serve.loading import file_sha256, fingerprint
from patchrec.serve.scorers import Query, Scored
from patchrec.serve.storage import StateRow, items_hash

PLANS = ("vanilla", "pft-i", "pft-s", "persrec")
RANKINGS = ("exact", "beam")


@dataclass
class LLMSettings:
    plan: str  # vanilla, pft-i, pft-s or persrec (the run's, as patchrec eval resolves it)
    max_items: int  # history length L: the newest L items of a history are read
    k: int = 5  # pft-i: newest items kept as text
    g: int = 5  # pft-s: session size
    persrec_tokens: int = 4  # persrec: personalization tokens per old segment
    persrec_segment: int = 20  # persrec: items per old segment
    persrec_old: str = "item"  # persrec: old items as item patches or text
    persrec_layout: str = "segments"  # persrec: segments, window or rolling (the whole timeline is read)
    persrec_window: int = 0  # persrec window layout: P
    persrec_recent: int = 0  # persrec window layout: R
    ranking: str = "exact"  # exact (every title's log-likelihood) or beam (constrained beam search)
    protocol: str = "authors"  # beam: authors or clean (patchrec.eval.beam)
    beams: int = 20  # beam: titles returned (the most a request's k can be)
    groups: int = 20  # beam: diverse groups
    diversity: float = 0.8  # beam: Hamming penalty
    max_rows: int = 8192  # rows of one forward pass (prompts, and prompts x title rows)

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"--ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.max_items < 1 or self.max_rows < 1:
            raise ValueError("max_items and max_rows must be >= 1")
        if self.ranking == "beam":
            get_protocol(self.protocol)
            if self.beams < 1 or self.groups < 1 or self.beams % self.groups:
                raise ValueError(f"--groups must divide --beams (beams={self.beams}, groups={self.groups})")


class LLMScorer:
    """A trained LLM run served by exact or beam ranking (module docstring); stateful for the persrec plan's
    rolling and window layouts (``refold_every``: the window layout's refold interval m)."""

    kind = "llm"

    def __init__(self, model_dir: str | Path, data: str, settings: LLMSettings, *,
                 tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32,
                 refold_every: int = DEFAULT_REFOLD_EVERY) -> None:  # fmt: skip
        model_dir = Path(model_dir)
        self.settings = settings
        self.dataset = load_data(data)
        persrec_tokens = settings.persrec_tokens if settings.plan == "persrec" else 0
        self.tokens = tokenize_dataset(load_tokenizer(tokenizer or model_dir), self.dataset,
                                       persrec_tokens=persrec_tokens)  # fmt: skip
        # a LoRA adapter directory loads its base and the adapter, merged (as patchrec eval does)
        self.model = load_model(model_dir, vocab_size=self.tokens.vocab_size, dtype=dtype, merge=True)
        self.model = self.model.to(device).eval()
        if self.model.lm.get_input_embeddings().num_embeddings < self.tokens.vocab_size:
            raise ValueError(f"--model {model_dir}: its embedding table is smaller than the vocabulary")
        self.planner = make_planner(settings.plan, k=settings.k, g=settings.g,
                                    segment=settings.persrec_segment, tokens=settings.persrec_tokens,
                                    old=settings.persrec_old, layout=settings.persrec_layout,
                                    window=settings.persrec_window,
                                    recent=settings.persrec_recent)  # fmt: skip
        # the rolling layout reads a user's whole timeline (as patchrec eval does); the others the newest L
        self.rolling = settings.plan == "persrec" and settings.persrec_layout == "rolling"
        self.window = settings.plan == "persrec" and settings.persrec_layout == "window"
        self.stateful = self.rolling or self.window
        self.packer = Packer(self.tokens, answer=False)
        self.catalog = CatalogTitles.from_table(self.tokens.titles)
        self.trie = TitleTrie(self.catalog, self.tokens.prompt.eot) if settings.ranking == "beam" else None
        self.num_items = self.dataset.num_items
        self.titles = list(self.dataset.titles)
        # beam search returns ``beams`` titles: the largest k a request can ask for
        self.max_k = settings.beams if settings.ranking == "beam" else self.num_items
        weights = sorted(model_dir.glob("*.safetensors"))
        config = {"settings": dataclasses.asdict(settings), "dtype": str(dtype),
                  "weights": [file_sha256(w) for w in weights[1:]]}  # fmt: skip
        self.fingerprint = fingerprint(weights[0], config) if weights else "unhashed"
        self.windows = None
        if self.window:
            self.windows = WindowStates(self.model, self.tokens, self.dataset, self.planner, self.fingerprint,
                                        refold_every=refold_every, max_rows=settings.max_rows)  # fmt: skip

    def rows(self, length: int) -> int:
        if self.window:  # a request reads the recent block against the stored state
            return min(length, self.settings.persrec_recent)
        return length if self.rolling else min(length, self.settings.max_items)

    def _samples(self, histories: list[np.ndarray]) -> Samples:
        """The histories as samples of an in-memory dataset: history b, then placeholder target item 0."""
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        items = np.concatenate([np.append(h, 0) for h in histories]).astype(np.int32)
        offsets = np.zeros(len(histories) + 1, dtype=np.int64)
        np.cumsum(lengths + 1, out=offsets[1:])
        users = len(histories)
        none = np.full((users, 2), -1, dtype=np.int64)
        test = np.stack([lengths, lengths], 1)
        dataset = dataclasses.replace(self.dataset, name="serve", items=items, user_offsets=offsets,
                                      user_ids=np.arange(users, dtype=np.int64),
                                      splits={"train": none, "val": none, "test": test})  # fmt: skip
        max_items = int(lengths.max()) if self.rolling else self.settings.max_items
        return Samples(dataset, "test", max_items, np.arange(users, dtype=np.int32), offsets[:-1].copy(),
                       offsets[:-1] + lengths)  # fmt: skip

    def _folded(self, history: np.ndarray) -> int:
        """Items of a history in its folded segments (the rest is the open segment)."""
        n = self.settings.persrec_segment
        return int(num_segments(np.array([max(len(history), 1)]), n)[0]) * n

    def _memories(self, queries: list[Query]) -> tuple[torch.Tensor, list[StateRow | None]]:
        """[Q, k, D] each user's memory after their folded segments, from the stored one when it is usable,
        and the rows to store for those that changed."""
        s, model = self.settings, self.model
        device = next(model.parameters()).device
        ids = torch.as_tensor(self.tokens.persrec_ids[: s.persrec_tokens], dtype=torch.long, device=device)
        memory = model.initial_memory(ids, len(queries)).clone()
        start = np.zeros(len(queries), dtype=np.int64)  # the first item not yet in the memory
        for i, q in enumerate(queries):
            row = q.stored
            if (row is not None and row.fingerprint == self.fingerprint and row.start == 0
                    and row.end <= self._folded(q.history)
                    and row.items_hash == items_hash(q.history[: row.end])):  # fmt: skip
                memory[i] = load_tensors(row.data)["memory"].to(device, memory.dtype)
                start[i] = row.end
        end = np.array([self._folded(q.history) for q in queries], dtype=np.int64)
        n = s.persrec_segment
        while (pending := np.flatnonzero(start < end)).size:  # one fold pass per segment, users batched
            segments = np.stack([queries[i].history[start[i] : start[i] + n] for i in pending])
            fold = self.packer.fold_pass(segments, s.persrec_old == "text", s.persrec_tokens, pending)
            memory = model.fold_pass(fold.to(device), memory)
            start[pending] += n
        changed: list[StateRow | None] = [None] * len(queries)
        for i, q in enumerate(queries):
            if q.stored is None or q.stored.end != end[i] or q.stored.fingerprint != self.fingerprint:
                data = save_tensors({"memory": memory[i].detach().cpu().contiguous()})
                changed[i] = StateRow(self.fingerprint, 0, int(end[i]), len(q.history),
                                      items_hash(q.history[: end[i]]), memory[i].nelement() *
                                      memory.element_size(), data)  # fmt: skip
        return memory, changed

    def score(self, queries: list[Query]) -> list[Scored]:
        s = self.settings
        index = np.arange(len(queries))
        memory, state, changed = None, None, [None] * len(queries)
        with torch.inference_mode():
            if self.rolling:
                memory, changed = self._memories(queries)
                histories = [q.history[self._folded(q.history) :] for q in queries]  # the open segments
            elif self.window:
                states, changed = self.windows.states(queries)
                state = concat_states(states)
                histories = [self.windows.recent(q.history) for q in queries]
            else:
                histories = [q.history[-s.max_items :] for q in queries]
            samples = self._samples(histories)
            if s.ranking == "exact":
                scores = exact_item_scores(self.model, self.tokens, samples, index, self.catalog,
                                           planner=self.planner, max_rows=s.max_rows, persrec_cache="on",
                                           memory=memory, state=state)  # fmt: skip
                return [Scored(row.float(), c) for row, c in zip(scores, changed, strict=True)]
            scores = torch.full((len(queries), self.num_items), -torch.inf)
            device = next(self.model.parameters()).device
            for batch in iter_batches(samples, self.planner, self.tokens, s.max_rows, answer=False):
                batch = batch.to(device)
                if memory is not None:
                    batch.memory = memory.index_select(0, batch.sample_ids)
                given = None if state is None else state.select(batch.sample_ids.cpu().numpy())
                returned = beam_search(self.model, batch, self.trie, beams=s.beams,
                                       groups=s.groups, diversity=s.diversity, protocol=s.protocol,
                                       persrec_cache="on", state=given)  # fmt: skip
                for sid, row in zip(batch.sample_ids.tolist(), returned, strict=True):
                    for title, value in reversed(row):  # best last: a title returned twice keeps its best
                        if title >= 0:
                            scores[sid, int(self.catalog.canonical[title])] = float(value)
        return [Scored(row, c) for row, c in zip(scores, changed, strict=True)]

    def maintain(self, queries: list[Query]) -> list[StateRow | None]:
        with torch.inference_mode():
            if self.window:  # refolded when due; a state still fresh enough is not even read
                return self.windows.states(queries, load=False)[1]
            if self.rolling:
                return self._memories(queries)[1]
        return [None] * len(queries)

    def describe(self) -> dict:
        s = self.settings
        out = {"kind": self.kind, "num_items": self.num_items, "history_items": s.max_items, "plan": s.plan,
               "ranking": s.ranking, "distinct_titles": len(self.catalog)}  # fmt: skip
        if s.plan == "pft-i":
            out["k"] = s.k
        if s.plan == "pft-s":
            out["g"] = s.g
        if s.plan == "persrec":
            out["persrec"] = {"layout": s.persrec_layout, "tokens": s.persrec_tokens,
                              "segment": s.persrec_segment, "old": s.persrec_old,
                              "state": "stored memory" if self.rolling else "rebuilt for every request"}
            if self.window:
                out["persrec"].update(window=s.persrec_window, recent=s.persrec_recent, state="stored state",
                                      refold_every=self.windows.refold_every)  # fmt: skip
            if self.rolling:
                out["history_items"] = None
        if s.ranking == "beam":
            out.update(beams=s.beams, groups=s.groups, diversity=s.diversity, protocol=s.protocol)
        return out


__all__ = ["LLMScorer", "LLMSettings"]
