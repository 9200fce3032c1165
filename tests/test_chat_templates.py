"""Prompts follow each family's chat template: the system prompt where the template puts it (folded into the
user turn for a template without a system role, Gemma's), the generation header before the answer, and the
family's own end-of-turn token closing the answer (the last label of every training sequence).

The templates are written here in each family's format (Llama 3 headers, ChatML for Qwen2.5 / Qwen3 /
SmolLM2, Mistral's [INST] turns with eos, Gemma's turns that refuse a system message), on the tiny test
tokenizer with the format's special tokens added: no download.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_data import TINY_SYSTEM, TINY_USER, build_tiny_tokenizer, tiny_dataset

from patchrec.batching.pack import iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, render_prompt_text, tokenize_dataset
from patchrec.data.dataset import make_samples

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for m in turns %}{% if m['role'] == 'user' %}[INST] "
    "{% if system and loop.last %}{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# family -> (template, its special tokens, the end-of-turn token, what the prompt ends with)
FAMILIES = {
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|im_start|>assistant\n"),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"], "</s>", "[/INST]"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<start_of_turn>model\n"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_and_end_of_turn_follow_the_template(tok_dir, family):
    template, specials, eot, ending = FAMILIES[family]
    tok = load_tokenizer(tok_dir)
    tok.add_tokens(specials, special_tokens=True)
    tok.chat_template = template
    text = render_prompt_text(tok, TINY_SYSTEM, TINY_USER)
    assert text.endswith(ending) and text.count(TINY_SYSTEM) == 1 and text.count("[HISTORY_SEQUENCE]") == 1
    if family == "gemma":  # no system role: one user turn, the system prompt first
        assert text == f"<s><start_of_turn>user\n{TINY_SYSTEM}\n\n{TINY_USER}<end_of_turn>\n{ending}"
    else:
        assert text.index(TINY_SYSTEM) < text.index(TINY_USER.split("[")[0])

    ds = tiny_dataset(seed=3, num_users=5, max_len=12)
    td = tokenize_dataset(tok, ds)
    assert td.prompt.eot_token == eot and td.prompt.eot == tok.convert_tokens_to_ids(eot)
    assert tok.decode(td.prompt.suffix.tolist()).endswith(ending)
    samples = make_samples(ds, "train", max_items=6)
    (batch,) = list(iter_batches(samples, make_planner("vanilla"), td, max_rows=10**6,
                                 order=np.arange(len(samples))))  # fmt: skip
    last = np.r_[np.flatnonzero(np.diff(batch.label_sample.numpy())), batch.label_ids.numel() - 1]
    assert len(last) == batch.num_sequences and set(batch.label_ids[last].tolist()) == {td.prompt.eot}


def test_a_template_that_drops_the_system_message_gets_it_in_the_user_turn(tok_dir):
    tok = load_tokenizer(tok_dir)
    tok.chat_template = "{% for m in messages if m['role'] == 'user' %}U: {{ m['content'] }}\n{% endfor %}A: "
    assert render_prompt_text(tok, TINY_SYSTEM, TINY_USER) == f"U: {TINY_SYSTEM}\n\n{TINY_USER}\nA: "
