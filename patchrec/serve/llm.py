"""The one place ``patchrec serve`` reaches the LLM stack: loading a trained LLM run and scoring a batch of
histories through the public entry points of ``patchrec.eval`` (``exact_item_scores`` for exact ranking,
``iter_batches`` + ``beam_search`` for beam ranking), so that a change of the decoder path behind them
changes nothing here.

A batch of histories becomes a ``Samples`` view over a small in-memory ``Dataset`` that holds the
histories back to back (each followed by a placeholder target, item 0, which the prompt never shows and
which leaves every score unchanged: item 0 is the lowest id of its title, so it is that title's scored
copy anyway). Plans and settings are the run's (``patchrec eval``'s resolution, done by the command).

The ``persrec`` plan runs with ``persrec_cache="on"``: each request's state is built from its old
segments, then the final block is read against it, as ``patchrec eval`` does. The state is not stored
between requests: ``patchrec.eval`` has no public entry point that scores titles from a state built
earlier (that needs the prompt cache of ``patchrec.eval.exact`` / ``patchrec.persrec.llm``, which the
decoder rewrite replaces), so an LLM user's state is rebuilt for every request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchrec.batching.pack import iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import Samples
from patchrec.data.source import load_data
from patchrec.eval.beam import TitleTrie, beam_search, get_protocol
from patchrec.eval.evaluate import exact_item_scores
from patchrec.eval.exact import CatalogTitles
from patchrec.model.lora import load_model
from patchrec.serve.loading import file_sha256, fingerprint
from patchrec.serve.scorers import Query, Scored
from patchrec.serve.storage import StateRow

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
    """A trained LLM run served by exact or beam ranking (module docstring); stateless."""

    kind = "llm"
    stateful = False

    def __init__(self, model_dir: str | Path, data: str, settings: LLMSettings, *,
                 tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
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

    def rows(self, length: int) -> int:
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

    def score(self, queries: list[Query]) -> list[Scored]:
        s = self.settings
        samples = self._samples([q.history if self.rolling else q.history[-s.max_items :] for q in queries])
        index = np.arange(len(queries))
        with torch.inference_mode():
            if s.ranking == "exact":
                scores = exact_item_scores(self.model, self.tokens, samples, index, self.catalog,
                                           planner=self.planner, max_rows=s.max_rows, persrec_cache="on")
                return [Scored(row.float()) for row in scores]  # fmt: skip
            scores = torch.full((len(queries), self.num_items), -torch.inf)
            device = next(self.model.parameters()).device
            for batch in iter_batches(samples, self.planner, self.tokens, s.max_rows, answer=False):
                returned = beam_search(self.model, batch.to(device), self.trie, beams=s.beams,
                                       groups=s.groups, diversity=s.diversity, protocol=s.protocol,
                                       persrec_cache="on")  # fmt: skip
                for sid, row in zip(batch.sample_ids.tolist(), returned, strict=True):
                    for title, value in reversed(row):  # best last: a title returned twice keeps its best
                        if title >= 0:
                            scores[sid, int(self.catalog.canonical[title])] = float(value)
        return [Scored(row) for row in scores]

    def maintain(self, queries: list[Query]) -> list[StateRow | None]:
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
                              "state": "rebuilt for every request"}  # fmt: skip
            if s.persrec_layout == "window":
                out["persrec"].update(window=s.persrec_window, recent=s.persrec_recent)
            if self.rolling:
                out["history_items"] = None
        if s.ranking == "beam":
            out.update(beams=s.beams, groups=s.groups, diversity=s.diversity, protocol=s.protocol)
        return out


__all__ = ["LLMScorer", "LLMSettings"]
