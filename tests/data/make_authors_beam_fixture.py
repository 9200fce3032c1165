"""Writes ``authors_beam_hf446*.json``: what transformers 4.46.3's group beam search returns when called the
way the PatchRec authors call it (ljy0ustc/PatchRec ``eval.py`` / ``fti_eval.py`` / ``fts_eval.py``), on a
tiny Llama whose weights are a version-independent numpy construction. ``tests/test_rank_beam_authors.py``
rebuilds the same model with the installed transformers and checks that ``patchrec.eval.beam`` (authors
protocol) returns the same titles in the same order with the same scores.

NOT run in CI. It needs transformers 4.46.3 (later releases moved group beam search out of the library) and
runs in a few seconds on CPU::

    python3 -m venv /tmp/tf446
    /tmp/tf446/bin/pip install torch==2.13.0 transformers==4.46.3 numpy
    /tmp/tf446/bin/python tests/data/make_authors_beam_fixture.py

The test imports ``build_model`` from this file (it must stay importable with transformers 5.x).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SEED = 20240726
PAD = 0  # the authors set ``llm_tokenizer.pad_token_id = 0``; 0 also occurs inside titles here
PREFIX = [60, 61, 62]  # stands in for "<|start_header_id|>assistant<|end_header_id|>\n\n"
# fixture file -> (vocabulary, eos id, prompts). The Llama-3 sized vocabulary (eos = <|eot_id|> = 128009)
# takes torch.topk down another code path (partial sort: the masked slot is token 0, the pad id).
VARIANTS = {
    "authors_beam_hf446.json": (64, 63, 10),
    "authors_beam_hf446_vocab128256.json": (128256, 128009, 4),
}
# Titles as token ids (item titles, one duplicate): one-token titles, titles that are token prefixes of
# others ([5] < [5, 9] < [5, 9, 12]; [0] < [0, 4]), shared prefixes, token 0 (the pad id) inside and at the
# start of titles and next to other children of a node, tokens 42 / 43 (what torch.topk on CPU puts in the
# masked slot of a 64-token vocabulary, see the test) at branching nodes, several titles of the longest length
# (6: they never take eos with max_new_tokens=6).
TITLES = [
    [5], [5, 9], [5, 9, 12], [5, 9, 12, 3, 3, 1], [5, 43], [7], [7, 0, 8], [7, 0, 8, 2], [0], [0, 4],
    [0, 4, 4, 4, 4, 4], [0, 11, 2], [3, 0, 8], [3, 1], [3, 1, 0], [3, 2, 2, 2, 2, 2], [3, 2, 0, 1],
    [3, 43, 1], [11], [11, 12, 13], [11, 12, 14], [12, 0], [12, 1, 5], [12, 1, 0], [13, 13], [14, 0, 0, 1],
    [15, 16, 17, 18, 19, 20], [16], [16, 2], [16, 42], [17, 3, 0], [18, 0, 18], [19, 20, 21], [20],
    [21, 22, 0], [22, 5, 9, 12], [22, 5, 0], [23, 1], [24, 2, 0, 2], [25], [26, 27, 28, 29, 30, 31], [27, 0],
    [27, 43], [28, 28, 1], [29], [30, 0, 2], [31, 4], [3, 1], [42, 0], [42, 1, 1], [11, 12, 0], [21, 22, 1],
    [26, 27, 0], [19, 20, 0], [0, 11, 0], [5, 9, 0], [15, 16, 0], [24, 2, 1],
]  # fmt: skip
GEN = dict(num_beams=20, num_beam_groups=20, diversity_penalty=0.8, num_return_sequences=20)


def scale_of(name: str, hidden: int) -> tuple[float, float]:
    """(mean, std) of a parameter's entries: unit-ish norms, large-ish logits (few near-ties)."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if "embed_tokens" in name:
        return 0.0, 1.0
    return 0.0, 2.0 / hidden**0.5  # projections and output head


def make_spec(vocab: int, eot: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=eot,
        pad_token_id=PAD,
    )  # fmt: skip


def build_model(spec: dict):
    """The tiny LlamaForCausalLM, every parameter in sorted-name order drawn from one numpy generator."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec))
    rng = np.random.default_rng(SEED)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            mean, std = scale_of(name, spec["hidden_size"])
            values = mean + std * rng.standard_normal(tuple(params[name].shape))
            params[name].copy_(torch.from_numpy(values.astype(np.float32)))
    return model.eval(), sorted(params)


def make_prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(SEED + 1)
    lengths = rng.integers(4, 24, size=count)
    return [rng.integers(1, 60, size=int(n)).tolist() + PREFIX for n in lengths]


# ---- verbatim from ljy0ustc/PatchRec utils.py (commit 27ac23c) ----
def find_sub_list(lst, sub_lst):
    length = len(sub_lst)
    ret = -1
    for index in range(len(lst)):
        if lst[index:index+length] == sub_lst:  # fmt: skip
            ret = index + length - 1
    return ret


def create_prefix_allowed_tokens_fn(candidate_token_ids, prefix_token_ids, tokenizer):
    trie = {}
    for token_ids in candidate_token_ids:
        level = trie
        token_ids = [prefix_token_ids[-1]] + token_ids
        for token_id in token_ids:
            if token_id not in level:
                level[token_id] = {}
            level = level[token_id]

    def prefix_allowed_tokens_fn(batch_id, input_ids):
        input_ids = input_ids.tolist()
        start_idx = find_sub_list(input_ids, prefix_token_ids)
        if start_idx < 0:
            return []
        else:
            start = trie
            for current_token in input_ids[start_idx:]:
                if current_token in start:
                    start = start[current_token]
                else:
                    break
            next_tokens = list(start.keys())
            if len(next_tokens) > 0:
                return next_tokens
            else:
                return [tokenizer.eos_token_id]

    return prefix_allowed_tokens_fn
# ---- end of the authors' code ----


def main() -> None:
    import torch
    import transformers

    assert transformers.__version__ == "4.46.3", transformers.__version__
    torch.set_num_threads(1)
    for name, (vocab, eot, count) in VARIANTS.items():
        write_fixture(Path(__file__).with_name(name), make_spec(vocab, eot), eot, make_prompts(count))


def write_fixture(path: Path, spec: dict, eot: int, prompts: list[list[int]]) -> None:
    import torch
    import transformers

    model, names = build_model(spec)
    model.config._attn_implementation = "eager"
    fn = create_prefix_allowed_tokens_fn(TITLES, PREFIX, SimpleNamespace(eos_token_id=eot))
    max_new_tokens = max(len(t) for t in TITLES)  # as the authors: no room for eos after the longest titles
    results = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                **GEN, prefix_allowed_tokens_fn=fn, do_sample=False, temperature=0.6, top_p=0.9, top_k=20,
                early_stopping=True, eos_token_id=eot, pad_token_id=PAD, use_cache=False,
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        seqs, titles = [], []
        for row in out.sequences[:, len(prompt) :].tolist():
            toks = row[: row.index(eot)] if eot in row else row  # finalize pads with eos then PAD
            seqs.append(toks)
            titles.append(TITLES.index(toks))  # every returned sequence is a whole catalog title
        results.append({"tokens": seqs, "titles": titles, "scores": out.sequences_scores.tolist()})
    fixture = {
        "transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED, "spec": spec,
        "parameters": names, "eot": eot, "pad": PAD, "prefix": PREFIX, "titles": TITLES, "prompts": prompts,
        "generate": {**GEN, "early_stopping": True, "do_sample": False, "max_new_tokens": max_new_tokens,
                     "length_penalty": model.generation_config.length_penalty},
        "results": results,
    }  # fmt: skip
    path.write_text(json.dumps(fixture) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
