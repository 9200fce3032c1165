"""Whole-catalog evaluation of a ``PackedDecoder`` on the packed path (docs/method.md §5).

Two rankings:
- ``"exact"`` (default): every distinct catalog title is scored by its log-likelihood (title tokens + eot)
  as the answer to the prompt; the prompt runs once per sample and the titles continue from its cached
  keys/values (``patchrec.eval.exact``). Full ranks for any K; ties follow ``patchrec.eval.metrics``
  (pessimistic).
- ``"beam"``: trie-constrained diverse beam search returning ``beams`` titles (``patchrec.eval.beam``), under
  ``protocol="authors"`` (default: transformers 4.46.3 group beam search as the PatchRec authors call it) or
  ``"clean"``. The rank follows the protocol's rule (``rank_in_returned``): authors, the LAST returned title
  whose text starts with the target's text (their ``calculate_rank``: ``real == generated[:len(real)]``);
  clean, the first returned title equal to the target's. A miss counts as rank ``beams`` (i.e. ">= beams"),
  so metrics are reported for K <= beams only.

Duplicate titles are one item. In the exact ranking the items sharing a title get that title's score, and
every copy except one (the target itself, else the lowest id) is set to -inf before ranking, so a title
is counted once and the target's duplicates never count against it. ``mask_history`` is passed to
``rank_samples`` (exact) or drops the user's earlier titles other than the target's from the beam list
before the rank rule reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchrec.batching.pack import Packer, iter_batches
from patchrec.batching.plan import Planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Samples
from patchrec.eval.beam import BeamProtocol, TitleTrie, beam_search, get_protocol
from patchrec.eval.exact import CatalogTitles, score_titles
from patchrec.eval.metrics import DEFAULT_KS, history_mask_pairs, rank_samples, ranking_metrics
from patchrec.persrec.llm import state_rows
from patchrec.persrec.state import PersrecState

RANKINGS = ("exact", "beam")
# Samples per rank_samples call: bounds the [B, N] score matrix; the packer still batches by max_rows.
SCORE_BATCH = 64


@dataclass
class EvalResult:
    metrics: dict[str, float]  # HR@K / NDCG@K for each K
    ranks: np.ndarray  # int64 [S], 0-based rank of each sample's target (beam: ``beams`` for a miss)
    ranking: str  # "exact" or "beam"
    mask_history: bool
    num_samples: int
    seconds: float  # wall time of the ranking
    config: dict[str, Any] = field(default_factory=dict)  # the protocol's settings (beams, groups, ...)


def limit_samples(samples: Samples, limit: int | None) -> Samples:
    """The first ``limit`` samples of a split (all when None)."""
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return samples.select(slice(0, limit))


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def exact_item_scores(
    model, tokens: TokenizedDataset, samples: Samples, index: np.ndarray, catalog: CatalogTitles, *,
    planner: Planner, max_rows: int, persrec_cache: str = "on", memory: torch.Tensor | None = None,
    shared_prefixes: bool = True, state: PersrecState | None = None,
) -> torch.Tensor:  # fmt: skip
    """fp32 [len(index), N]: every item's title log-likelihood, duplicates of a title set to -inf except one
    copy (the row's target when it carries that title, else the lowest item id).

    ``memory`` [len(samples), k, D] (PerSRec's rolling layout): each sample's memory, e.g. a served user's
    stored state, read by its prompt instead of the memory its batch's fold passes would compute.
    ``state`` (PerSRec's window and segments layouts; one user per sample): each sample's key/value state,
    e.g. a served user's stored one, read by its prompt's final block instead of the state its old blocks
    would give (``patchrec.persrec.llm.encode_with_state``). ``shared_prefixes``: see
    ``patchrec.eval.exact.score_titles``."""
    device = _model_device(model)
    title_scores = torch.empty(len(index), len(catalog), dtype=torch.float32)
    row_of = {int(s): r for r, s in enumerate(index.tolist())}
    for batch in iter_batches(samples, planner, tokens, max_rows, order=index, answer=False):
        batch = batch.to(device)
        if memory is not None:
            if batch.memory_rows is None:
                raise ValueError("memory applies to the persrec plan's rolling layout")
            batch.memory = memory.to(device).index_select(0, batch.sample_ids)
        given = None if state is None else state.select(batch.sample_ids.cpu().numpy())
        scores = score_titles(model, batch, catalog, tokens.prompt.eot, max_rows=max_rows,
                              persrec_cache=persrec_cache, shared_prefixes=shared_prefixes,
                              state=given).cpu()  # fmt: skip
        rows = [row_of[int(s)] for s in batch.sample_ids.tolist()]
        title_scores[rows] = scores
    item_title = torch.as_tensor(catalog.item_title)
    item_scores = title_scores[:, item_title]
    keep = torch.zeros(len(catalog.item_title), dtype=torch.bool)
    keep[torch.as_tensor(catalog.canonical)] = True
    item_scores[:, ~keep] = -torch.inf
    targets = torch.as_tensor(samples.targets()[index].astype(np.int64))
    rows = torch.arange(len(index))
    # The target keeps its score and the canonical copy of its title steps aside for it.
    item_scores[rows, torch.as_tensor(catalog.canonical)[item_title[targets]]] = -torch.inf
    item_scores[rows, targets] = title_scores[rows, item_title[targets]]
    return item_scores


def persrec_state_stats(
    model, tokens: TokenizedDataset, samples: Samples, planner: Planner
) -> dict[str, Any]:
    """Size of the per-sample PerSRec state the ``on`` cache keeps (keys + values of every layer, in the
    model's dtype): mean rows and bytes per sample, also without the prompt prefix (the same for every user,
    so it could be stored once)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype
    row_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    prefix = Packer(tokens).head_len
    layout = planner.persrec
    options = {"persrec_segment": planner.segment, "persrec_tokens": planner.tokens,
               "persrec_old": planner.old, "persrec_layout": layout.layout, "persrec_window": layout.window,
               "persrec_recent": layout.recent}  # fmt: skip
    if layout.layout == "rolling":
        # The state is the memory: k vectors of the model's width (the prompt's own rows are recomputed).
        memory = float(planner.tokens * config.hidden_size * dtype.itemsize)
        return options | {"persrec_state_rows_mean": 0.0, "persrec_state_bytes_per_sample": memory,
                          "persrec_token_state_bytes_per_sample": memory,
                          "persrec_state_bytes_per_row": row_bytes}  # fmt: skip
    rows = state_rows(prefix, samples.history_lengths, layout)
    mean = float(rows.mean()) if len(rows) else 0.0
    return options | {"persrec_state_rows_mean": mean, "persrec_state_bytes_per_sample": mean * row_bytes,
                      "persrec_token_state_bytes_per_sample": (mean - prefix) * row_bytes,
                      "persrec_state_bytes_per_row": row_bytes}  # fmt: skip


def rank_in_returned(
    returned: list[int], target: str, texts: list[str], *, rule: str, miss: int, drop: set[int] = frozenset(),
) -> int:  # fmt: skip
    """0-based rank of ``target`` (a title string) in a returned list of distinct-title indices (``texts[u]``
    is title u's string; -1 is no title); titles in ``drop`` are removed first; ``miss`` when it is not there.

    ``"first_equal"``: the first returned title equal to the target. ``"last_prefix"``: the authors'
    ``calculate_rank`` on decoded, stripped texts: the LAST position whose text starts with the target's text
    (so a longer title like "Heathers" counts for "Heat", and a later duplicate wins over an earlier one).
    """
    if rule not in ("first_equal", "last_prefix"):
        raise ValueError(f"rank rule must be 'first_equal' or 'last_prefix', got {rule!r}")
    kept = [texts[u] if u >= 0 else None for u in returned if u not in drop]
    if rule == "first_equal":
        return next((r for r, text in enumerate(kept) if text == target), miss)
    hits = [r for r, text in enumerate(kept) if text is not None and text.strip().startswith(target)]
    return hits[-1] if hits else miss


def beam_ranks(
    model, tokens: TokenizedDataset, samples: Samples, catalog: CatalogTitles, *, planner: Planner,
    max_rows: int, beams: int, groups: int, diversity: float, protocol: BeamProtocol, mask_history: bool,
    progress: bool, persrec_cache: str = "on",
) -> np.ndarray:  # fmt: skip
    from tqdm.auto import tqdm

    device = _model_device(model)
    trie = TitleTrie(catalog, tokens.prompt.eot)
    titles = samples.dataset.titles
    texts = [titles[i] for i in catalog.canonical.tolist()]
    target_items = samples.targets().astype(np.int64)
    targets = catalog.item_title[target_items]
    ranks = np.full(len(samples), beams, dtype=np.int64)
    seen: dict[int, set[int]] = {}
    if mask_history:
        rows, items = history_mask_pairs(samples, np.arange(len(samples)))
        for r, i in zip(rows.tolist(), catalog.item_title[items.numpy()].tolist(), strict=True):
            seen.setdefault(r, set()).add(i)
    bar = tqdm(total=len(samples), desc="beam", disable=not progress, leave=False)
    for batch in iter_batches(samples, planner, tokens, max_rows, answer=False):
        returned = beam_search(model, batch.to(device), trie, beams=beams, groups=groups, diversity=diversity,
                               protocol=protocol, persrec_cache=persrec_cache)  # fmt: skip
        for sid, row in zip(batch.sample_ids.tolist(), returned, strict=True):
            drop = seen.get(sid, set()) - {int(targets[sid])}
            ranks[sid] = rank_in_returned([u for u, _ in row], titles[target_items[sid]], texts,
                                          rule=protocol.rank_rule, miss=beams, drop=drop)  # fmt: skip
        bar.update(batch.num_sequences)
    bar.close()
    return ranks


def _check_args(tokens: TokenizedDataset, samples: Samples, planner: Planner, ranking: str, max_rows: int,
                beams: int, groups: int, diversity: float, persrec_cache: str) -> None:  # fmt: skip
    """``ValueError`` naming the first of ``evaluate``'s arguments that is out of range."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if planner.views != 1:
        raise ValueError(f"planner must give one view per sample, got {planner.name!r} ({planner.views})")
    if persrec_cache not in ("on", "off"):
        raise ValueError(f"--persrec-cache must be 'on' or 'off', got {persrec_cache!r}")
    if ranking == "beam":
        if beams < 1:
            raise ValueError(f"beams must be >= 1, got {beams}")
        if groups < 1 or beams % groups:
            raise ValueError(f"groups must be >= 1 and divide beams={beams}, got {groups}")
        if diversity < 0:
            raise ValueError(f"diversity must be >= 0, got {diversity}")
    if tokens.titles.offsets.shape[0] - 1 != samples.dataset.num_items:
        raise ValueError("tokens must be the tokenisation of samples.dataset (title counts differ)")


def evaluate(
    model,
    tokens: TokenizedDataset,
    samples: Samples,
    *,
    planner: Planner,
    ranking: str = "exact",
    ks=DEFAULT_KS,
    mask_history: bool = False,
    max_rows: int = 8192,
    limit: int | None = None,
    progress: bool = True,
    beams: int = 20,
    groups: int = 20,
    diversity: float = 0.8,
    protocol: str | BeamProtocol = "authors",
    persrec_cache: str = "on",
    shared_prefixes: bool = True,
) -> EvalResult:
    """Rank the whole catalog for every sample (the first ``limit`` when given); see the module docstring.

    ``persrec_cache`` (persrec plan only): ``"on"`` builds each sample's state from its prefix and old
    segments first and answers from the recent block against it, ``"off"`` runs the whole prompt; the scores
    are the same (``patchrec.persrec.llm``). The config records it and the state's size.

    ``max_rows`` bounds the rows of one pass (prompts, and prompts x title rows in a catalog chunk).
    ``shared_prefixes`` (exact): titles sharing a token prefix share its rows (``PrefixTree``; the same
    scores up to fp32 rounding, a quarter fewer catalog rows on ML-1M); False: one sequence per title.
    The model is put in eval mode and gradients are off; its training flag is restored afterwards.
    """
    _check_args(tokens, samples, planner, ranking, max_rows, beams, groups, diversity, persrec_cache)
    if ranking == "beam":
        protocol = get_protocol(protocol)
    samples = limit_samples(samples, limit)
    catalog = CatalogTitles.from_table(tokens.titles)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if ranking == "exact":
                ranks = rank_samples(
                    lambda index: exact_item_scores(
                        model, tokens, samples, index, catalog, planner=planner, max_rows=max_rows,
                        persrec_cache=persrec_cache, shared_prefixes=shared_prefixes,
                    ),
                    samples, mask_history=mask_history, batch_size=SCORE_BATCH, progress=progress,
                    desc="exact",
                )  # fmt: skip
            else:
                ranks = beam_ranks(
                    model, tokens, samples, catalog, planner=planner, max_rows=max_rows, beams=beams,
                    groups=groups, diversity=diversity, protocol=protocol, mask_history=mask_history,
                    progress=progress, persrec_cache=persrec_cache,
                )  # fmt: skip
    finally:
        model.train(was_training)
    config: dict[str, Any] = {"ranking": ranking, "plan": planner.name, "max_rows": max_rows,
                              "distinct_titles": len(catalog)}
    if ranking == "exact":
        config["shared_prefixes"] = bool(shared_prefixes)
    if planner.is_persrec:
        config.update(persrec_cache=persrec_cache, **persrec_state_stats(model, tokens, samples, planner))
    if ranking == "beam":
        config.update(beams=beams, groups=groups, diversity=diversity, miss_rank=f">= {beams}",
                      **protocol.settings(TitleTrie(catalog, tokens.prompt.eot)))  # fmt: skip
        # A miss is only known to rank >= beams: HR/NDCG@K for K > beams would count misses as hits.
        ks = [k for k in ks if k <= beams] or [beams]
    config["ks"] = [int(k) for k in ks]
    return EvalResult(
        metrics=ranking_metrics(ranks, ks), ranks=ranks, ranking=ranking, mask_history=mask_history,
        num_samples=len(ranks), seconds=time.perf_counter() - start, config=config,
    )  # fmt: skip
