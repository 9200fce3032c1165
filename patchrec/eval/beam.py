"""Trie-constrained diverse beam search over the catalog titles (docs/method.md §5), written here because
transformers no longer ships group beam search. Two protocols (``PROTOCOLS``) share one loop:

- ``"authors"``: what transformers 4.46.3's ``_group_beam_search`` + ``BeamSearchScorer`` return when called
  the way the PatchRec authors' ``eval.py`` / ``fti_eval.py`` / ``fts_eval.py`` call it (checked token for
  token against transformers 4.46.3 by ``tests/test_rank_beam_authors.py``):
  - their trie allows eot only at a leaf, so a title that is a token prefix of a longer title is never
    returned; ``max_new_tokens`` = the longest title's token count, so the longest titles never take eot and
    are returned by ``finalize`` instead;
  - every group starts with ``k = beams // groups`` beams, the first at score 0 and the rest at -1e9; a step
    scores each beam's full-vocabulary log-softmax minus the Hamming penalty (``diversity`` x how many beams
    of earlier groups of the sample took the token at this step, done groups counting ``k`` pad tokens, id 0),
    with disallowed tokens at -inf, plus the beam's score; the candidates are the top 2k of the group's
    [k x vocab] scores (so masked -inf tokens fill in when fewer are allowed, and become running beams: with
    k = 1 a group ending a title shows such a token to the later groups of that step; which one is
    torch.topk's tie order, here on CPU, e.g. token 0 for a 128,256-token vocabulary; CUDA may differ);
  - candidates are walked in rank order: eot at rank < k finishes a hypothesis scored
    sum / generated_len ** length_penalty (``length_penalty`` 1.0, generated_len counting the eot); eot at
    rank >= k is skipped; other tokens become the next k running beams; with ``early_stopping=True`` a group
    is done once it holds k hypotheses (it keeps its best k) and feeds pad tokens from then on;
  - at the step limit every running beam of a group that is not done becomes a hypothesis (no eot in its
    length); the returned list is every group's hypotheses by score, ties to the later one (transformers
    pops from the end of an ascending stable sort).
- ``"clean"``: eot allowed wherever a title ends, one starting beam per group, raw log-likelihood ranking
  (``length_penalty`` 0), room for eot after the longest title; a group is done when it holds k hypotheses
  and no running beam scores above the worst of them (scores only fall: log-probs <= 0, penalties >= 0); done
  groups take no part in later steps; only finished titles are returned, ties to the earlier group.

How a returned list maps to a rank (the authors': the last returned title whose text starts with the target's
text) lives in ``patchrec.eval.evaluate``.

Keys/values: the prompt once (``patchrec.eval.exact.encode_prompts``), then one row per running beam per step:
part A attends to the cached prompt, part B to the beam's own cached tokens plus the new one (all running
beams have the same length at a step, so the cache is [beams x t, Hkv, D] per layer, each beam's tokens
back to back; a step gathers every beam's parent's rows and appends its new one, a ``BlockPlan``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from patchrec.batching.packed import PackedBatch
from patchrec.eval.exact import CatalogTitles, encode_prompts, forward_continuations
from patchrec.model.attention import BlockPlan
from patchrec.persrec.state import PersrecState

EOT_RULES = ("title_end", "leaf")
RANK_RULES = ("first_equal", "last_prefix")


@dataclass(frozen=True)
class BeamProtocol:
    """How the search ends titles, scores hypotheses and returns them (see the module docstring)."""

    name: str
    eot_at: str  # "title_end": eot wherever a title ends; "leaf": only where no longer title continues
    length_penalty: float  # hypothesis score = sum of step scores / generated_len ** length_penalty
    room_for_eot: bool  # steps = longest title + 1 (True) or longest title (the authors' max_new_tokens)
    early_stopping: bool  # done at k hypotheses (True) or when no running beam can beat the worst one
    pad_id: int | None  # token a done group feeds (counts in later groups' Hamming penalty); None: nothing
    hf_bookkeeping: bool  # transformers': k starting beams (0, -1e9, ...), masked tokens fill the top 2k,
    #                       running beams become hypotheses at the step limit, ties to the later hypothesis
    rank_rule: str  # "first_equal": first returned title equal to the target's; "last_prefix": the authors'

    def settings(self, trie: TitleTrie) -> dict:
        """What evaluation records next to the metrics (``trie``: the catalog searched)."""
        return {
            "protocol": self.name, "length_penalty": self.length_penalty, "max_new_tokens": self.steps(trie),
            "max_new_tokens_rule": "longest title + 1" if self.room_for_eot else "longest title",
            "eot_rule": self.eot_at, "early_stopping": self.early_stopping, "pad_id": self.pad_id,
            "hf_bookkeeping": self.hf_bookkeeping, "rank_rule": self.rank_rule,
            "unreachable_prefix_titles": len(trie.prefix_titles()) if self.eot_at == "leaf" else 0,
        }  # fmt: skip

    def steps(self, trie: TitleTrie) -> int:
        """Tokens generated at most (transformers' ``max_new_tokens``)."""
        return trie.longest + (1 if self.room_for_eot else 0)


PROTOCOLS = {
    "authors": BeamProtocol("authors", eot_at="leaf", length_penalty=1.0, room_for_eot=False,
                            early_stopping=True, pad_id=0, hf_bookkeeping=True, rank_rule="last_prefix"),
    "clean": BeamProtocol("clean", eot_at="title_end", length_penalty=0.0, room_for_eot=True,
                          early_stopping=False, pad_id=None, hf_bookkeeping=False, rank_rule="first_equal"),
}  # fmt: skip


def get_protocol(protocol: str | BeamProtocol) -> BeamProtocol:
    if isinstance(protocol, BeamProtocol):
        proto = protocol
    elif protocol in PROTOCOLS:
        proto = PROTOCOLS[protocol]
    else:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)} or a BeamProtocol, got {protocol!r}")
    if proto.eot_at not in EOT_RULES or proto.rank_rule not in RANK_RULES:
        raise ValueError(f"protocol {proto.name!r}: eot_at must be in {EOT_RULES}, rank_rule in {RANK_RULES}")
    return proto


class TitleTrie:
    """Prefix tree over the distinct titles' token ids; where eot is allowed depends on the protocol."""

    def __init__(self, catalog: CatalogTitles, eot: int):
        if len(catalog) == 0:
            raise ValueError("catalog must hold at least one title")
        if (catalog.tokens == eot).any():
            raise ValueError(f"eot id {eot} occurs inside a title: the trie could not tell ends apart")
        self.eot = eot
        self.children: list[dict[int, int]] = [{}]
        self.title_at: list[int] = [-1]  # distinct title completed at each node, -1 for none
        for u in range(len(catalog)):
            node = 0
            for tok in catalog.title(u).tolist():
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][tok] = nxt
                    self.children.append({})
                    self.title_at.append(-1)
                node = nxt
            self.title_at[node] = u
        self.longest = int(catalog.lengths.max())
        self._allowed: dict[tuple[int, bool], tuple[torch.Tensor, list[int]]] = {}

    def allowed(self, node: int, eot_at: str = "title_end") -> tuple[torch.Tensor, list[int]]:
        """(allowed token ids [n], next node of each, the node itself for eot), memoised per node and rule."""
        leaf_only = eot_at == "leaf"
        hit = self._allowed.get((node, leaf_only))
        if hit is None:
            toks, nodes = list(self.children[node]), list(self.children[node].values())
            if self.title_at[node] >= 0 and not (leaf_only and toks):
                toks.append(self.eot)
                nodes.append(node)
            hit = (torch.tensor(toks, dtype=torch.long), nodes)
            self._allowed[(node, leaf_only)] = hit
        return hit

    def prefix_titles(self) -> list[int]:
        """Distinct titles that are a token prefix of a longer one (unreachable with eot at leaves only)."""
        return [u for node, u in enumerate(self.title_at) if u >= 0 and self.children[node]]


@dataclass
class _Beam:
    seq: int  # sequence of the batch
    group: int
    node: int  # trie node after ``tokens``; -1 once a masked (-inf) token was taken
    tokens: list[int]
    score: float  # accumulated step scores (an fp32 value); -inf for a beam that took a masked token
    parent: int  # row of the previous step's running beams whose cache this beam extends


@dataclass
class _Group:
    """One group's finished hypotheses, kept as transformers' ``BeamHypotheses`` keeps them."""

    hyps: list[tuple[float, int, list[int]]] = dataclasses.field(default_factory=list)  # score, title, tokens
    worst: float = 1e9
    done: bool = False

    def add(self, score: float, title: int, tokens: list[int], k: int) -> None:
        if len(self.hyps) < k or score > self.worst:
            self.hyps.append((score, title, tokens))
            if len(self.hyps) > k:
                ranked = sorted((h[0], i) for i, h in enumerate(self.hyps))
                del self.hyps[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)


class BeamDecoder:
    """What the search asks of a model: the first answer token's distribution for each sequence, then the
    next-token log-probs of every running beam, step by step. ``PackedBeamDecoder`` is patchrec's; the
    benchmarks drive the same search with transformers' own KV cache and with the authors' uncached loop."""

    num_sequences: int
    first_logprobs: torch.Tensor  # fp32 [Q, V]

    def step(self, parents: list[int], tokens: list[int], seqs: list[int], step: int) -> torch.Tensor:
        """[n, V] next-token log-probs of the running beams of step ``step`` (>= 1): beam i extends the
        previous step's running beam ``parents[i]`` by ``tokens[i]``; ``seqs`` (non-decreasing) are their
        sequences."""
        raise NotImplementedError


class PackedBeamDecoder(BeamDecoder):
    """The prompt once (``patchrec.eval.exact.encode_prompts``), then one row per running beam per step:
    part A attends to the cached prompt, part B to the beam's own cached tokens plus the new one (module
    docstring)."""

    def __init__(self, model, batch: PackedBatch, *, persrec_cache: str = "on",
                 state: PersrecState | None = None):  # fmt: skip
        self.model = model
        self.cache = encode_prompts(model, batch, persrec_cache=persrec_cache, state=state)
        self.num_sequences = batch.num_sequences
        self.first_logprobs = self.cache.first_logprobs
        self.past_k: list[torch.Tensor] | None = None
        self.past_v: list[torch.Tensor] | None = None

    def step(self, parents, tokens, seqs, step):
        logp, self.past_k, self.past_v = _step(self.model, self.cache, parents, tokens, seqs, self.past_k,
                                               self.past_v, step)  # fmt: skip
        return logp


def beam_search(
    model, batch: PackedBatch, trie: TitleTrie, *, beams: int = 20, groups: int = 20, diversity: float = 0.8,
    protocol: str | BeamProtocol = "authors", return_tokens: bool = False, persrec_cache: str = "on",
    state: PersrecState | None = None,
) -> list[list[tuple]]:  # fmt: skip
    """Per sequence of a prompt-only batch: ``beams`` (title index, score[, tokens]) best first (fewer for
    ``clean`` when the catalog runs out). Title -1 only for an authors hypothesis ending on a masked token.
    A persrec batch decodes from its state + final block (``persrec_cache``, ``state``: see
    ``encode_prompts``)."""
    check_search(beams, groups, diversity)
    decoder = PackedBeamDecoder(model, batch, persrec_cache=persrec_cache, state=state)
    return search(decoder, trie, beams=beams, groups=groups, diversity=diversity, protocol=protocol,
                  return_tokens=return_tokens)  # fmt: skip


def check_search(beams: int, groups: int, diversity: float) -> None:
    if beams < 1 or groups < 1 or beams % groups:
        raise ValueError(f"groups must divide beams (beams={beams}, groups={groups})")
    if diversity < 0:
        raise ValueError(f"diversity must be >= 0, got {diversity}")


def search(
    decoder: BeamDecoder, trie: TitleTrie, *, beams: int = 20, groups: int = 20, diversity: float = 0.8,
    protocol: str | BeamProtocol = "authors", return_tokens: bool = False,
) -> list[list[tuple]]:  # fmt: skip
    """``beam_search`` over any ``BeamDecoder`` (the search itself: groups, trie, protocol)."""
    check_search(beams, groups, diversity)
    proto = get_protocol(protocol)
    k = beams // groups
    num_seq = decoder.num_sequences
    state = {(s, g): _Group() for s in range(num_seq) for g in range(groups)}
    starts = [0.0] + [-1e9] * (k - 1) if proto.hf_bookkeeping else [0.0]
    running = [_Beam(s, g, 0, [], sc, -1) for s in range(num_seq) for g in range(groups) for sc in starts]
    max_steps = proto.steps(trie)
    step = 0
    while running and step < max_steps:
        if step == 0:
            logp = decoder.first_logprobs[[b.seq for b in running]]
        else:
            logp = decoder.step([b.parent for b in running], [b.tokens[-1] for b in running],
                                [b.seq for b in running], step)  # fmt: skip
        logp = logp.float().cpu()
        nxt: list[_Beam] = []
        for s in range(num_seq):
            chosen = torch.zeros(logp.shape[1], dtype=torch.float32)  # tokens taken by earlier groups
            for g in range(groups):
                group = state[s, g]
                if group.done:
                    if proto.pad_id is not None:
                        chosen[proto.pad_id] += k
                    continue
                rows = [i for i, b in enumerate(running) if b.seq == s and b.group == g]
                kept = _select(running, rows, logp, chosen * diversity, trie, k, proto, group)
                for beam in kept:
                    chosen[beam.tokens[-1]] += 1
                if not group.done:
                    nxt.extend(kept)
        running = nxt
        step += 1
    if proto.hf_bookkeeping:  # transformers' finalize: the beams of groups not done become hypotheses
        for b in running:
            title = trie.title_at[b.node] if b.node >= 0 else -1
            state[b.seq, b.group].add(b.score / (step**proto.length_penalty), title, b.tokens, k)
    out = []
    for s in range(num_seq):
        hyps = [h for g in range(groups) for h in state[s, g].hyps]
        if proto.hf_bookkeeping:
            hyps = sorted(hyps, key=lambda h: h[0])[::-1]
        else:
            hyps.sort(key=lambda h: -h[0])
        out.append([(u, sc, toks) if return_tokens else (u, sc) for sc, u, toks in hyps[:beams]])
    return out


def _candidates(running, rows, logp, penalty, trie, proto, full):
    """A group's candidates best first: (scores [C], token ids [C], parent row of each [C], next nodes)."""
    eot_at = proto.eot_at
    if full:  # transformers' view: top 2k of the whole [k, vocab] score matrix, masked entries at -inf
        vocab = logp.shape[1]
        mask = torch.full((len(rows), vocab), -torch.inf)
        for r, i in enumerate(rows):
            if running[i].node >= 0:
                mask[r, trie.allowed(running[i].node, eot_at)[0]] = 0
        base = torch.tensor([running[i].score for i in rows], dtype=torch.float32)
        scores = ((logp[rows] - penalty) + mask + base[:, None]).view(1, -1)
        top, index = torch.topk(scores, 2 * len(rows), dim=1, largest=True, sorted=True)
        top, index = top[0], index[0]
        parents = [rows[j] for j in (index // vocab).tolist()]
        tokens = index % vocab
        nodes = []
        for p, t in zip(parents, tokens.tolist(), strict=True):
            node = running[p].node
            nodes.append(node if t == trie.eot else trie.children[node].get(t, -1) if node >= 0 else -1)
        return top, tokens, parents, nodes
    cand_scores, cand_tokens, parents, nodes = [], [], [], []
    for i in rows:
        beam = running[i]
        if beam.node < 0:
            continue  # every candidate of a beam at -inf is -inf
        toks, next_nodes = trie.allowed(beam.node, eot_at)
        cand_scores.append((logp[i, toks] - penalty[toks]) + beam.score)
        cand_tokens.append(toks)
        nodes.extend(next_nodes)
        parents.extend([i] * len(next_nodes))
    scores = torch.cat(cand_scores) if cand_scores else torch.zeros(0)
    tokens = torch.cat(cand_tokens) if cand_tokens else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return scores[order], tokens[order], [parents[c] for c in order], [nodes[c] for c in order]


def _select(running, rows, logp, penalty, trie, k, proto, group: _Group) -> list[_Beam]:
    """One group's step: the next running beams (their last tokens count for later groups' penalty); finished
    hypotheses go into ``group``, which may become done."""
    scores, tokens, parents, nodes = _candidates(running, rows, logp, penalty, trie, proto, full=False)
    # Too few allowed candidates from live beams: transformers fills the top 2k from the -1e9 starting beams
    # or masked (-inf) entries, tie order set by torch.topk over the whole matrix: do the same.
    if proto.hf_bookkeeping and int((scores > -1e8).sum()) < 2 * k:
        scores, tokens, parents, nodes = _candidates(running, rows, logp, penalty, trie, proto, full=True)
    kept: list[_Beam] = []
    for rank, (score, token, parent, node) in enumerate(
        zip(scores.tolist(), tokens.tolist(), parents, nodes, strict=True)
    ):
        if rank >= 2 * k:
            break
        beam = running[parent]
        if token == trie.eot:
            if rank < k:
                title = trie.title_at[node] if node >= 0 else -1
                group.add(score / ((len(beam.tokens) + 1) ** proto.length_penalty), title, beam.tokens, k)
            continue
        kept.append(_Beam(beam.seq, beam.group, node, beam.tokens + [token], score, parent))
        if len(kept) == k:
            break
    if proto.early_stopping:
        group.done = len(group.hyps) >= k
    elif len(group.hyps) >= k and (not kept or max(b.score for b in kept) <= group.worst):
        if not proto.length_penalty:  # scores only fall: no running beam can beat the worst hypothesis
            group.done = True
            return []
    return kept


def _step(model, cache, parents, tokens, seqs, past_k, past_v, step):
    """Feed every running beam's last token; returns its next-token log-probs and the grown caches (per layer
    [beams * step, Hkv, D]: each beam's ``step`` tokens back to back)."""
    device = cache.first_logprobs.device
    num_beams = len(parents)
    parents = torch.tensor(parents, device=device)
    token_ids = torch.tensor(tokens, device=device)
    seq = torch.tensor(seqs, device=device)
    position_ids = cache.lengths[seq] + (step - 1)
    # Part A groups the rows by sequence: running beams are kept sorted by sequence. Counted on the host
    # from the list (no device sync; shapes only on the meta device, where the GPU planner traces a step).
    counts = torch.bincount(torch.tensor(seqs), minlength=len(cache.lengths))
    by_sample_cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device=device, dtype=torch.int32)
    cu_q = torch.arange(num_beams + 1, device=device, dtype=torch.int32)
    # Part B of beam i: its parent's step - 1 cached tokens (the context), then its own new row.
    past = step - 1
    context_rows = 0 if past_k is None else past_k[0].shape[0]
    key_index = torch.cat([parents[:, None] * past + torch.arange(past, device=device),
                           context_rows + torch.arange(num_beams, device=device)[:, None]], dim=1).ravel()
    own = BlockPlan(cu_q, 1, cu_q * step, step, key_index, past_k, past_v, keep=key_index)  # fmt: skip
    hidden = forward_continuations(model, cache, token_ids, position_ids, by_sample_cu,
                                   int(counts.max()), own)  # fmt: skip
    return model.logprobs(hidden), own.keys, own.values
