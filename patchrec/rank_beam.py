"""The authors' evaluation protocol: beam search constrained by a prefix trie over the catalog titles, with
diverse beam groups (METHOD.md §5), written here because transformers no longer ships group beam search.

Semantics follow transformers' former ``_group_beam_search`` + ``BeamSearchScorer``:
- ``beams`` beams in ``groups`` groups of ``beams // groups``; each group starts from one empty beam.
- Step scores are the model's full-vocabulary log-softmax (not renormalised over the allowed tokens, as a
  logits processor masking after log-softmax gives); only trie children are allowed, and end-of-turn only
  where a complete title ends.
- Hamming diversity: within a step groups are processed in order, and a token's score in group g is
  lowered by ``diversity`` x (how many beams of earlier groups chose that token at this step). The penalty
  stays in the accumulated beam score, as in transformers.
- Per group the best 2k candidates are walked in order: eot within the first k finishes a hypothesis (the
  group keeps its best k), other tokens fill the k next beams. A group is done when it holds k finished
  hypotheses and no running beam scores above the worst of them (scores only fall: log-probs <= 0,
  penalties >= 0); with ``length_penalty`` != 0 the finished score is divided by title_len ** length_penalty.
- The returned list: all groups' finished hypotheses sorted by score, the best ``beams`` of them.

Keys/values: the prompt once (``rank_exact.encode_prompts``), then one row per running beam per step: part A
attends to the cached prompt, part B to the beam's own cached tokens plus the new one (all running beams
have the same length at a step, so the cache is a dense [beams, t, Hkv, D] tensor per layer, reordered by
parent after every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchrec.pack import PackedBatch
from patchrec.rank_exact import CatalogTitles, encode_prompts, forward_continuations, log_softmax_rows

END = -1  # "next node" of an end-of-turn step: the hypothesis is finished


class TitleTrie:
    """Prefix tree over the distinct titles' token ids; a node ending a title also allows ``eot``."""

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
        self.max_depth = int(catalog.lengths.max()) + 1
        self._allowed: dict[int, tuple[torch.Tensor, list[int]]] = {}

    def allowed(self, node: int) -> tuple[torch.Tensor, list[int]]:
        """(allowed token ids [n], next node of each; ``END`` for eot), memoised per node."""
        hit = self._allowed.get(node)
        if hit is None:
            toks, nodes = list(self.children[node]), list(self.children[node].values())
            if self.title_at[node] >= 0:
                toks.append(self.eot)
                nodes.append(END)
            hit = (torch.tensor(toks, dtype=torch.long), nodes)
            self._allowed[node] = hit
        return hit


@dataclass
class _Beam:
    seq: int  # sequence of the batch
    group: int
    node: int  # trie node after ``tokens``
    tokens: list[int]
    score: float  # accumulated log-probs minus diversity penalties
    parent: int  # row of the previous step's running beams whose cache this beam extends


def beam_search(
    model, batch: PackedBatch, trie: TitleTrie, *, beams: int = 20, groups: int = 20, diversity: float = 0.8,
    length_penalty: float = 0.0, return_tokens: bool = False,
) -> list[list[tuple]]:  # fmt: skip
    """Per sequence of a prompt-only batch: up to ``beams`` (title index, score[, tokens]) best first."""
    if beams < 1 or groups < 1 or beams % groups:
        raise ValueError(f"groups must divide beams (beams={beams}, groups={groups})")
    if diversity < 0:
        raise ValueError(f"diversity must be >= 0, got {diversity}")
    per_group = beams // groups
    cache = encode_prompts(model, batch)
    device = cache.first_logprobs.device
    num_seq = batch.num_sequences
    running = [_Beam(s, g, 0, [], 0.0, -1) for s in range(num_seq) for g in range(groups)]
    finished: dict[tuple[int, int], list[tuple[float, int, list[int]]]] = {}
    past_k: list[torch.Tensor] | None = None
    past_v: list[torch.Tensor] | None = None
    step = 0
    while running and step < trie.max_depth:
        if step == 0:
            logp = cache.first_logprobs[[b.seq for b in running]]
        else:
            logp, past_k, past_v = _step(model, cache, running, past_k, past_v, step, device)
        logp = logp.cpu()
        nxt: list[_Beam] = []
        for s in range(num_seq):
            chosen = torch.zeros(logp.shape[1], dtype=torch.float32)  # tokens picked by earlier groups
            for g in range(groups):
                rows = [i for i, b in enumerate(running) if b.seq == s and b.group == g]
                if not rows:
                    continue
                kept = _select(running, rows, logp, chosen * diversity, trie, per_group, length_penalty,
                               finished.setdefault((s, g), []))  # fmt: skip
                for beam in kept:
                    chosen[beam.tokens[-1]] += 1
                nxt.extend(kept)
        running = nxt
        step += 1
    out = []
    for s in range(num_seq):
        hyps = [h for g in range(groups) for h in finished.get((s, g), [])]
        hyps.sort(key=lambda h: -h[0])
        out.append([(u, sc, toks) if return_tokens else (u, sc) for sc, u, toks in hyps[:beams]])
    return out


def _select(running, rows, logp, penalty, trie, k, length_penalty, done) -> list[_Beam]:
    """One group's step: the next running beams; finished hypotheses go into ``done`` (best k kept)."""
    cand_scores, cand_tokens, cand_nodes, cand_parent = [], [], [], []
    for i in rows:
        beam = running[i]
        toks, nodes = trie.allowed(beam.node)
        cand_scores.append(beam.score + logp[i, toks] - penalty[toks])
        cand_tokens.append(toks)
        cand_nodes.extend(nodes)
        cand_parent.extend([i] * len(nodes))
    scores = torch.cat(cand_scores)
    tokens = torch.cat(cand_tokens)
    order = torch.argsort(scores, descending=True, stable=True)[: 2 * k].tolist()
    kept: list[_Beam] = []
    for rank, c in enumerate(order):
        beam, score = running[cand_parent[c]], float(scores[c])
        if cand_nodes[c] == END:
            if rank < k:
                norm = score / (len(beam.tokens) ** length_penalty) if length_penalty else score
                done.append((norm, trie.title_at[beam.node], beam.tokens))
                done.sort(key=lambda h: -h[0])
                del done[k:]
            continue
        kept.append(_Beam(beam.seq, beam.group, cand_nodes[c], beam.tokens + [int(tokens[c])], score,
                          cand_parent[c]))  # fmt: skip
        if len(kept) == k:
            break
    if len(done) >= k and (not kept or max(b.score for b in kept) <= done[-1][0]) and not length_penalty:
        return []  # no running beam can beat the group's worst finished hypothesis any more
    return kept


def _step(model, cache, running, past_k, past_v, step, device):
    """Feed every running beam's last token; returns its next-token log-probs and the grown caches."""
    num_beams = len(running)
    parents = torch.tensor([b.parent for b in running], device=device)
    token_ids = torch.tensor([b.tokens[-1] for b in running], device=device)
    seq = torch.tensor([b.seq for b in running], device=device)
    position_ids = cache.lengths[seq] + (step - 1)
    # Part A groups the rows by sequence: running beams are kept sorted by sequence.
    counts = torch.bincount(seq, minlength=len(cache.lengths))
    by_sample_cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    new_k: list[torch.Tensor] = []
    new_v: list[torch.Tensor] = []
    cu_q = torch.arange(num_beams + 1, device=device, dtype=torch.int32)
    cu_k = cu_q * step

    def own(layer, k, v):
        if past_k is None:
            keys, values = k[:, None], v[:, None]
        else:
            keys = torch.cat([past_k[layer].index_select(0, parents), k[:, None]], dim=1)
            values = torch.cat([past_v[layer].index_select(0, parents), v[:, None]], dim=1)
        new_k.append(keys)
        new_v.append(values)
        flat = keys.shape[1]
        return keys.flatten(0, 1), values.flatten(0, 1), cu_q, cu_k, 1, flat

    hidden = forward_continuations(model, cache, token_ids, position_ids, by_sample_cu,
                                   int(counts.max()), own)  # fmt: skip
    return log_softmax_rows(model, hidden), new_k, new_v
