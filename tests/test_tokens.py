"""Tokenised catalog and prompt: markers, CSR titles, prompt halves, end-of-turn token.

The Llama-3 checks skip when ../shared is absent; the tiny fixtures live in tiny_data.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import LLAMA3_TOKENIZER, shared_path
from tiny_data import TINY_SYSTEM, TINY_TITLES, TINY_USER, build_tiny_tokenizer, tiny_dataset

from patchrec.batching.tokens import (
    END_SEQ,
    HISTORY_MARKERS,
    ITEM_SEP,
    PLAIN_TEMPLATE,
    START_SEQ,
    add_history_markers,
    history_text,
    load_tokenizer,
    render_prompt_text,
    tokenize_dataset,
    tokenize_titles,
)
from patchrec.data.dataset import make_samples


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tinytok"))


@pytest.fixture(scope="module")
def llama3():
    shared_path("tokenizers", "llama3")
    return load_tokenizer(LLAMA3_TOKENIZER)


def test_markers_are_special_and_vocab_grows(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    base = len(tok) - 3
    ids = tok.convert_tokens_to_ids(list(HISTORY_MARKERS))
    assert sorted(ids) == [base, base + 1, base + 2]
    assert add_history_markers(tok) == base + 3  # idempotent
    # Never merged with neighbouring text, whatever touches them.
    got = tok("Heat" + ITEM_SEP + "Babe" + END_SEQ + ".", add_special_tokens=False)["input_ids"]
    heat = tok("Heat", add_special_tokens=False)["input_ids"]
    babe = tok("Babe", add_special_tokens=False)["input_ids"]
    dot = tok(".", add_special_tokens=False)["input_ids"]
    assert got == heat + [ids[1]] + babe + [ids[2]] + dot


def test_titles_csr_matches_per_title_tokenisation(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    table = tokenize_titles(tok, TINY_TITLES)
    assert table.offsets.dtype == np.int64 and table.tokens.dtype == np.int32
    assert len(table) == len(TINY_TITLES) and table.offsets[0] == 0 and table.offsets[-1] == len(table.tokens)
    for i, title in enumerate(TINY_TITLES):
        assert table.title(i).tolist() == tok(title, add_special_tokens=False)["input_ids"]


def test_empty_title_names_the_item(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match="item 2"):
        tokenize_titles(tok, ["Heat", "Babe", "", "Nixon"])


def test_plain_template_prompt_halves(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert not tok.chat_template
    td = tokenize_dataset(tok, tiny_dataset())
    text = render_prompt_text(tok, TINY_SYSTEM, TINY_USER)
    assert text == PLAIN_TEMPLATE.format(bos="<s>", system=TINY_SYSTEM, user=TINY_USER)
    before, after = text.split("[HISTORY_SEQUENCE]")
    assert td.prompt.prefix.tolist() == tok(before, add_special_tokens=False)["input_ids"]
    assert td.prompt.prefix[0] == tok.bos_token_id
    assert td.prompt.suffix.tolist() == tok(after, add_special_tokens=False)["input_ids"]
    assert td.prompt.eot == tok.eos_token_id and td.prompt.eot_token == "</s>"
    assert td.vocab_size == len(tok)
    with pytest.raises(ValueError, match="eot_token"):
        tokenize_dataset(tok, tiny_dataset(), eot_token="not a token at all")


def test_vanilla_prompt_equals_concatenated_pieces_llama3(llama3):
    """Special markers split the text, so tokenising the whole vanilla prompt = concatenating the pieces."""
    from patchrec.data.release import load_release

    start, sep, end = llama3.convert_tokens_to_ids([START_SEQ, ITEM_SEP, END_SEQ])
    rng = np.random.default_rng(0)
    for name in ("ml-1m", "goodreads"):
        ds = load_release(shared_path("data", "patchrec", name))
        td = tokenize_dataset(llama3, ds)
        samples = make_samples(ds, "test", max_items=100)
        text = render_prompt_text(llama3, ds.system_prompt, ds.user_prompt)
        for i in rng.choice(len(samples), size=40, replace=False):
            hist = samples.history(int(i)).tolist()
            full = text.replace("[HISTORY_SEQUENCE]", history_text([ds.titles[t] for t in hist]))
            expected = llama3(full, add_special_tokens=False)["input_ids"]
            pieces = [td.prompt.prefix.tolist(), [start]]
            for j, item in enumerate(hist):
                pieces += [[sep]] if j else []
                pieces.append(td.titles.title(item).tolist())
            pieces += [[end], td.prompt.suffix.tolist()]
            assert sum(pieces, []) == expected
        assert td.prompt.prefix[0] == 128000 and td.prompt.eot == 128009 and td.vocab_size == 128259


LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_chat_template_prompt_and_end_of_turn(llama3):
    tok = load_tokenizer(LLAMA3_TOKENIZER)
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    tok.eos_token = "<|end_of_text|>"  # as in base Llama-3: the template, not eos, says how a turn ends
    td = tokenize_dataset(tok, tiny_dataset())
    assert td.prompt.eot_token == "<|eot_id|>" and td.prompt.eot == 128009
    header = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    assert td.prompt.prefix[:2].tolist() == [128000, header[0]]
    assert td.prompt.prefix.tolist().count(128009) == 1  # the system turn closed, the user turn open
    suffix = tok.decode(td.prompt.suffix.tolist())
    assert suffix.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # Explicit override wins.
    assert tokenize_dataset(tok, tiny_dataset(), eot_token="<|end_of_text|>").prompt.eot == 128001


# What Llama-3.1/3.2 templates do with the date (their default system message prints "Today Date").
DATED_TEMPLATE = (
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "Today Date: {{ date_string }} / {{ strftime_now('%Y-%m-%d') }}\n"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)


def test_chat_template_dates_are_fixed(tiny_tokenizer_dir, monkeypatch):
    """Defect: templates that print today's date gave a different prompt every day. Prompts are rendered on
    PROMPT_DATE whatever the clock says, through date_string and through strftime_now."""
    import datetime

    from transformers.utils import chat_template_utils

    from patchrec.batching.tokens import PROMPT_DATE, render_prompt_text

    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = DATED_TEMPLATE
    texts = []
    for day in (datetime.datetime(2026, 11, 25), datetime.datetime(2031, 2, 3)):
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None, day=day):
                return day

        monkeypatch.setattr(chat_template_utils, "datetime", Clock)
        plain = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        assert day.strftime("%Y") in plain  # the clock really moved
        texts.append(render_prompt_text(tok, "sys", "watched [HISTORY_SEQUENCE]."))
    assert texts[0] == texts[1]
    assert f"Today Date: {PROMPT_DATE:%d %b %Y} / {PROMPT_DATE:%Y-%m-%d}" in texts[0]
