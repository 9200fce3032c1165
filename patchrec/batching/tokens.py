"""Token-level view of a dataset: the tokenizer with the history markers, the catalog titles as a CSR table,
and the prompt split around the history (docs/method.md §1).

Everything downstream (planning, packing, stats) works on these integer arrays; the tokenizer is called once
per title and once per prompt half, never per sample.

Prompt rendering:
- with a chat template: ``[system, user]`` messages rendered with ``add_generation_prompt=True``; a template
  without a system role (Gemma's raises on one; some drop it silently) gets one user message instead, the
  system prompt and a blank line before the user prompt (what Gemma 3's own template does with a system
  message);
- without one: ``PLAIN_TEMPLATE`` = ``"{bos}System: {system}\\nUser: {user}\\nAssistant: "`` (``{bos}`` is the
  tokenizer's bos token text, empty when it has none).
The rendered text is split at ``[HISTORY_SEQUENCE]``; the history between the halves is
``<|start_seq|>title_1<|item_sep|>title_2...title_n<|end_seq|>`` with no spaces around the markers. Because
the markers are special tokens (the tokenizer splits the text at them), tokenising the whole rendered text
equals prefix + ``<|start_seq|>`` + tokens(title_1) + ``<|item_sep|>`` + ... + ``<|end_seq|>`` + suffix, which
is what the packer concatenates.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from patchrec.batching.hf_files import load_hf_tokenizer
from patchrec.data.dataset import HISTORY_PLACEHOLDER, Dataset

START_SEQ = "<|start_seq|>"
ITEM_SEP = "<|item_sep|>"
END_SEQ = "<|end_seq|>"
HISTORY_MARKERS = (START_SEQ, ITEM_SEP, END_SEQ)
# PerSRec's personalization tokens (docs/method.md §6): ``<|persrec_0|>`` ... one new embedding row each.
PERSREC_TOKEN = "<|persrec_{}|>"
PLAIN_TEMPLATE = "{bos}System: {system}\nUser: {user}\nAssistant: "
# Chat templates that print today's date (Llama-3.x: "Today Date: ...") would give a different prompt, and so
# different token counts and scores, on every day: they are rendered as if it were always this day.
PROMPT_DATE = datetime.date(2024, 7, 26)
# Stand-in answer used to find what the chat template writes after an assistant turn (its end-of-turn token).
_ANSWER_PROBE = "PATCHREC_ANSWER_PROBE"


def add_history_markers(tokenizer) -> int:
    """Add the three history markers as special tokens (idempotent); returns the new vocabulary size.

    Special tokens are never merged with neighbouring text, so ``title<|item_sep|>title`` tokenises as the
    titles' own tokens around one marker id. The model's embedding table must be resized to the returned size.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": list(HISTORY_MARKERS)})
    ids = tokenizer.convert_tokens_to_ids(list(HISTORY_MARKERS))
    if len(set(ids)) != 3 or tokenizer.unk_token_id in ids:
        raise ValueError(f"tokenizer could not add the history markers {HISTORY_MARKERS} (got ids {ids})")
    return len(tokenizer)


def persrec_token_names(k: int) -> list[str]:
    """The names of PerSRec's ``k`` personalization tokens T_1..T_k."""
    return [PERSREC_TOKEN.format(i) for i in range(k)]


def add_persrec_tokens(tokenizer, k: int) -> np.ndarray:
    """Add PerSRec's ``k`` personalization tokens as special tokens (idempotent); returns their int32 ids.

    Like the history markers they are never merged with text, and each is one new row of the embedding
    table (resize the model to ``len(tokenizer)``), read by ``patch_embed`` as a one-token row.
    """
    if k < 1:
        raise ValueError(f"--persrec-tokens must be >= 1, got {k}")
    names = persrec_token_names(k)
    # add_tokens(special_tokens=True) keeps the history markers registered (a new
    # ``additional_special_tokens`` list could replace them).
    tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    if len(set(ids)) != k or tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"tokenizer could not add the PerSRec tokens {names} (got ids {ids})")
    return np.asarray(ids, dtype=np.int32)


def load_tokenizer(path: str | Path):
    """Any Hugging Face tokenizer from a local directory or a ``.gguf`` file (offline), with the history
    markers added."""
    tokenizer = load_hf_tokenizer(path)
    add_history_markers(tokenizer)
    return tokenizer


@dataclass(frozen=True)
class TitleTable:
    """Token ids of every catalog title, CSR: title ``i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # int64 [N+1]
    tokens: np.ndarray  # int32 [offsets[-1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def title(self, item: int) -> np.ndarray:
        return self.tokens[self.offsets[item] : self.offsets[item + 1]]


def tokenize_titles(tokenizer, titles: Sequence[str]) -> TitleTable:
    """Tokenise each title on its own (no specials, no leading space), once, into a ``TitleTable``."""
    encoded = tokenizer(list(titles), add_special_tokens=False)["input_ids"] if len(titles) else []
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    if np.any(lengths == 0):
        item = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"title of item {item} ({titles[item]!r}) tokenises to no tokens")
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(offsets[-1]))
    return TitleTable(offsets, tokens.astype(np.int32))


class _FixedClock(datetime.datetime):
    """``datetime`` whose ``now()`` is ``PROMPT_DATE`` (what transformers' ``strftime_now`` reads)."""

    @classmethod
    def now(cls, tz=None):
        return cls(PROMPT_DATE.year, PROMPT_DATE.month, PROMPT_DATE.day, tzinfo=tz)


def apply_chat_template(tokenizer, messages: list[dict[str, str]], **kwargs) -> str:
    """``tokenizer.apply_chat_template`` as text, rendered on ``PROMPT_DATE``: ``date_string`` is what
    Llama-3.x templates print, and the clock behind transformers' ``strftime_now`` template function is
    replaced for the call (render variables cannot shadow it: transformers turns them into plain data)."""
    from unittest import mock

    from transformers.utils import chat_template_utils

    with mock.patch.object(chat_template_utils, "datetime", _FixedClock):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, date_string=PROMPT_DATE.strftime("%d %b %Y"), **kwargs
        )


def render_prompt_text(tokenizer, system_prompt: str, user_prompt: str) -> str:
    """The full prompt text (up to where the answer starts), still holding ``[HISTORY_SEQUENCE]`` once."""
    if user_prompt.count(HISTORY_PLACEHOLDER) != 1:
        raise ValueError(f"user_prompt must contain {HISTORY_PLACEHOLDER} exactly once")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}]
        try:
            text = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
        except TemplateError:  # e.g. Gemma's raise_exception('System role not supported')
            text = None
        if text is None or (system_prompt and system_prompt not in text):
            folded = [{"role": "user", "content": f"{system_prompt}\n\n{user_prompt}" if system_prompt else
                       user_prompt}]  # fmt: skip
            text = apply_chat_template(tokenizer, folded, add_generation_prompt=True)
    else:
        text = PLAIN_TEMPLATE.format(bos=tokenizer.bos_token or "", system=system_prompt, user=user_prompt)
    if text.count(HISTORY_PLACEHOLDER) != 1:
        raise ValueError(f"rendered prompt must contain {HISTORY_PLACEHOLDER} exactly once: {text!r}")
    return text


def history_text(titles: Sequence[str]) -> str:
    """``<|start_seq|>t1<|item_sep|>t2...<|end_seq|>``: the all-text history as the tokenizer sees it."""
    return START_SEQ + ITEM_SEP.join(titles) + END_SEQ


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant answer: whatever special token the chat template writes right after
    the answer text, else ``tokenizer.eos_token``."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _ANSWER_PROBE}]
        try:
            text = apply_chat_template(tokenizer, messages)
        except Exception:  # templates that refuse this conversation shape: fall back to eos
            text = ""
        if _ANSWER_PROBE in text:
            after = text.split(_ANSWER_PROBE, 1)[1]
            ids = tokenizer(after, add_special_tokens=False)["input_ids"]
            if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
                return tokenizer.convert_ids_to_tokens(ids[0])
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token and no chat template: pass eot_token explicitly")
    return tokenizer.eos_token


@dataclass(frozen=True)
class PromptTokens:
    """Everything of the prompt except the history items, as token ids."""

    prefix: np.ndarray  # int32, tokens before the history (bos and chat headers included)
    suffix: np.ndarray  # int32, tokens after the history up to where the answer starts
    start_seq: int
    item_sep: int
    end_seq: int
    eot: int  # appended to the answer title; the loss predicts it
    eot_token: str


def tokenize_prompt(
    tokenizer, system_prompt: str, user_prompt: str, eot_token: str | None = None
) -> PromptTokens:
    """Render the prompt, split it at ``[HISTORY_SEQUENCE]`` and tokenise each half once."""
    text = render_prompt_text(tokenizer, system_prompt, user_prompt)
    before, after = text.split(HISTORY_PLACEHOLDER)
    marker_ids = tokenizer.convert_tokens_to_ids(list(HISTORY_MARKERS))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in marker_ids:
        raise ValueError("tokenizer lacks the history markers: use load_tokenizer or add_history_markers")
    eot_token = eot_token if eot_token is not None else end_of_turn_token(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(eot_token)
    if eot is None or (eot == tokenizer.unk_token_id and eot_token != tokenizer.unk_token):
        raise ValueError(f"eot_token {eot_token!r} is not a single token of this tokenizer")

    def ids(part: str) -> np.ndarray:
        return np.asarray(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=np.int32)

    return PromptTokens(ids(before), ids(after), *(int(i) for i in marker_ids), int(eot), eot_token)


@dataclass(frozen=True)
class TokenizedDataset:
    """A dataset's catalog and prompt in token ids, plus the vocabulary size the embedding table needs."""

    titles: TitleTable
    prompt: PromptTokens
    vocab_size: int  # len(tokenizer) after adding the markers (and the PerSRec tokens)
    # int32 [k]: ids of PerSRec's personalization tokens T_1..T_k (empty unless tokenised for persrec)
    persrec_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def avg_title_tokens(self) -> float:
        return float(self.titles.lengths.mean()) if len(self.titles) else 0.0


def tokenize_dataset(
    tokenizer, dataset: Dataset, eot_token: str | None = None, persrec_tokens: int = 0
) -> TokenizedDataset:
    """Tokenise ``dataset``'s titles and prompt with ``tokenizer`` (markers are added if missing);
    ``persrec_tokens`` > 0 also adds that many PerSRec personalization tokens (the persrec plan)."""
    vocab_size = add_history_markers(tokenizer)
    persrec_ids = np.zeros(0, dtype=np.int32)
    if persrec_tokens:
        persrec_ids = add_persrec_tokens(tokenizer, persrec_tokens)
        vocab_size = len(tokenizer)
    titles = tokenize_titles(tokenizer, dataset.titles)
    prompt = tokenize_prompt(tokenizer, dataset.system_prompt, dataset.user_prompt, eot_token)
    return TokenizedDataset(titles, prompt, vocab_size, persrec_ids)
