"""The PatchRec authors' released code paths, written again over patchrec's token layout so that the benches
time what they do (github.com/ljy0ustc/PatchRec at 27ac23c: ``fti_trainer.py`` / ``fts_trainer.py``
``compute_loss``, ``fti_eval.py`` / ``fts_eval.py`` ``EvalCollator`` and ``generate``; ``eval.py``; vanilla
training is a stock ``SFTTrainer`` step).

What is the same as their code:
- the whole padded, uncompressed token batch goes through ``embed_tokens`` first; then, per sample, a Python
  loop over the items between the history markers computes ``embed_tokens(title).mean(0)`` for EVERY item
  (text items too: the trainers compute it before deciding) and concatenates the pieces: the prompt head up
  to ``<|start_seq|>``, per compressed item [its mean, its separator's embedding], per text item its title
  and separator embeddings, per session [the mean of its items' means, the separator after its last item],
  then the rest of the sequence;
- which items are compressed: PFT-I the items before the newest ``k``; PFT-S sessions of ``g`` (the oldest
  holding the remainder), then ``g`` item patches, then ``g`` text items (their index arithmetic);
- training: right padding to the longest compressed sequence, ``model(inputs_embeds, attention_mask,
  labels)``: full-vocabulary logits at every position and transformers' shifted cross-entropy over the
  answer tokens; evaluation: left padding, ``generate(..., use_cache=False)`` (every beam step runs the
  whole prompt and the generated tokens again; transformers 4.46 takes logits at the last position only).

What differs: their prompts come from their collators (chat template, titles as text, ``<|item_sep_id|>``
style markers, the answer from the dataset), here from patchrec's packer (the same layout, patchrec's
markers), and tokenisation is not timed (a collator's work, before the step); they run bf16 with
flash-attention 2 under accelerate / TRL, the CPU benches fp32 with transformers' sdpa; pre-training
(``pt_trainer.py``: both views of each sample, items compressed at random) is not benched here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from patchrec.batching.pack import pack_batch
from patchrec.batching.plan import make_planner


def uncompressed(setup, samples, ids: np.ndarray, length: int, *, answer: bool, left: bool = False):
    """The samples' full text prompts as token ids [Q, T] padded with 0 (right, or ``left``), their attention
    mask and, with ``answer``, the answer + eot appended and labels (-100 outside the answer)."""
    plans = make_planner("vanilla").plan_batch(samples.history_lengths[ids], width=length)
    batch = pack_batch(samples, ids, plans, setup.tokens, answer=answer)
    tokens = batch.token_ids.long()  # vanilla: one token per row
    cu = batch.cu_seqlens.tolist()
    seqs, labels = [], []
    for q in range(batch.num_sequences):
        seq = tokens[cu[q] : cu[q + 1]].tolist()
        lab = [-100] * len(seq)
        if answer:
            mine = batch.label_sample == q
            first = int(batch.label_rows[mine][0])  # the last prompt row predicts the first answer token
            answer_ids = batch.label_ids[mine].tolist()  # title tokens then eot
            seq = seq[: first - cu[q] + 1] + answer_ids
            lab = [-100] * (first - cu[q] + 1) + answer_ids
        seqs.append(seq)
        labels.append(lab)
    width = max(map(len, seqs))
    ids_t = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    lab_t = torch.full((len(seqs), width), -100, dtype=torch.long)
    for q, (seq, lab) in enumerate(zip(seqs, labels, strict=True)):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids_t[q, span], mask[q, span], lab_t[q, span] = torch.tensor(seq), 1, torch.tensor(lab)
    return ids_t, mask, lab_t


def _item_spans(input_ids: torch.Tensor, prompt) -> tuple[int, int, list[tuple[int, int]]]:
    start = torch.where(input_ids == prompt.start_seq)[0][0].item()
    end = torch.where(input_ids == prompt.end_seq)[0][0].item()
    seps = torch.where(input_ids == prompt.item_sep)[0].tolist()
    return start, end, list(zip([start] + seps, seps + [end], strict=True))


def _fti_pieces(embed, ids, embeds, start, end, spans, k):
    """fti_trainer.compute_loss's per-sample loop: (embedding pieces, (lo, hi) spans of the original that
    each piece's mask / labels come from)."""
    pieces, source = [embeds[: start + 1]], [(0, start + 1)]
    for idx, (a, b) in enumerate(spans):
        item = embed(ids[a + 1 : b]).mean(dim=0)  # every item, as their loop does
        if idx < len(spans) - k:
            pieces += [item.view(1, -1), embeds[b : b + 1]]
            source.append((b - 1, b + 1))
        else:
            pieces.append(embeds[a + 1 : b + 1])
            source.append((a + 1, b + 1))
    pieces.append(embeds[end + 1 :])
    source.append((end + 1, len(ids)))
    return pieces, source


def _fts_pieces(embed, ids, embeds, start, end, spans, g):
    """fts_trainer.compute_loss's per-sample loop (sessions, then item patches, then the text tail)."""
    n = len(spans)
    items = [(embed(ids[a + 1 : b]).mean(dim=0), (a, b)) for a, b in spans]
    pieces, source = [embeds[: start + 1]], [(0, start + 1)]
    for group in range(math.ceil((n - 2 * g) / g)):
        if n % g > 0:
            lo, hi = max(0, (group - 1) * g + n % g), group * g + n % g
        else:
            lo, hi = group * g, (group + 1) * g
        members = items[lo:hi]
        last = members[-1][1][1]
        pieces += [torch.stack([m[0] for m in members]).mean(dim=0).view(1, -1), embeds[last : last + 1]]
        source.append((last - 1, last + 1))
    end_item = start
    for idx in range(max(0, n - 2 * g), n - g):
        item, (_, b) = items[idx]
        end_item = b
        pieces += [item.view(1, -1), embeds[b : b + 1]]
        source.append((b - 1, b + 1))
    pieces.append(embeds[end_item + 1 :])
    source.append((end_item + 1, len(ids)))
    return pieces, source


def compressed(embed, input_ids, mask, labels, prompt, plan: str, k: int, g: int, *, left: bool = False):
    """The authors' compression of a padded batch: (inputs_embeds [Q, W, D], attention_mask, labels), padded
    right (trainers) or ``left`` (eval collators) to the longest compressed sequence."""
    embeds = embed(input_ids)  # the whole uncompressed batch, as their code starts
    out_e, out_m, out_l, lengths = [], [], [], []
    for i, ids in enumerate(input_ids):
        start, end, spans = _item_spans(ids, prompt)
        make = _fti_pieces if plan == "pft-i" else _fts_pieces
        pieces, source = make(embed, ids, embeds[i], start, end, spans, k if plan == "pft-i" else g)
        new_mask = torch.cat([mask[i][a:b] for a, b in source])
        out_e.append(torch.cat(pieces))
        out_m.append(new_mask)
        out_l.append(torch.cat([labels[i][a:b] for a, b in source]) if labels is not None else None)
        lengths.append(int(new_mask.sum()))
    width = max(lengths)
    for i in range(len(out_e)):
        short = width - out_e[i].shape[0]
        if short > 0:
            pad = (0, short) if not left else (short, 0)
            out_e[i] = F.pad(out_e[i], (0, 0, *pad))
            out_m[i] = F.pad(out_m[i], pad)
            if out_l[i] is not None:
                out_l[i] = F.pad(out_l[i], pad, value=-100)
        else:
            keep = slice(0, width) if not left else slice(-width, None)
            out_e[i], out_m[i] = out_e[i][keep], out_m[i][keep]
            if out_l[i] is not None:
                out_l[i] = out_l[i][keep]
    stacked_labels = torch.stack(out_l) if labels is not None else None
    return torch.stack(out_e), torch.stack(out_m), stacked_labels


def train_loss(hf, inputs, prompt, plan: str, k: int = 5, g: int = 5) -> torch.Tensor:
    """One training step's loss as the authors compute it (``inputs``: ``uncompressed(..., answer=True)``)."""
    input_ids, mask, labels = inputs
    if plan == "vanilla":  # a stock SFTTrainer step: the token ids straight into the model
        return hf(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
    embeds, mask, labels = compressed(hf.get_input_embeddings(), input_ids, mask, labels, prompt, plan, k, g)
    return hf(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss


def eval_prefill(hf, inputs, prompt, plan: str, k: int = 5, g: int = 5) -> torch.Tensor:
    """fp32 [Q, V] first-answer-token log-probs as the authors' evaluation gets them: the collator's
    compression of a left-padded batch, then generate's first forward (no cache, positions from the mask,
    logits at the last position)."""
    input_ids, mask, _ = inputs
    if plan == "vanilla":
        embeds = hf.get_input_embeddings()(input_ids)
    else:
        embeds, mask, _ = compressed(hf.get_input_embeddings(), input_ids, mask, None, prompt, plan, k, g,
                                     left=True)  # fmt: skip
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
             logits_to_keep=1)  # fmt: skip
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)
