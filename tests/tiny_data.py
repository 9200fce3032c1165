"""Tiny, file-free fixtures shared by tests: a BPE tokenizer trained on a handful of titles and a small
dataset with awkward history lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchrec.data.dataset import Dataset

TINY_TITLES = [
    "Toy Story", "Jumanji", "Matrix, The", "Heat", "Casino", "Sense and Sensibility", "Babe", "Se7en",
    "Braveheart", "Apollo 13", "Batman Forever", "Clueless", "Kids of the Round Table", "Nixon", "I",
]
TINY_SYSTEM = "You are a helpful assistant in movie recommendations."
TINY_USER = "A user has watched [HISTORY_SEQUENCE]. Please recommend one movie for this user to watch next."


def build_tiny_tokenizer(path: Path) -> Path:
    """A 300-id byte-level BPE trained on the tiny titles, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TINY_TITLES * 5 + [TINY_SYSTEM, TINY_USER], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(path))
    return path


def tiny_dataset(seed: int = 0, num_users: int = 12, max_len: int = 40) -> Dataset:
    """Users with 1..max_len items (some with too few for a sample), a 48:1:1-like split per user."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=num_users)
    lengths[:3] = [1, 4, max_len]  # no sample / exactly one history item / longest
    items = rng.integers(0, len(TINY_TITLES), size=int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    splits = {}
    train = np.stack([np.zeros(num_users), np.maximum(lengths - 3, 0)], 1)
    val = np.stack([lengths - 2, lengths - 2], 1)
    test = np.stack([lengths - 1, lengths - 1], 1)
    for name, r in (("train", train), ("val", val), ("test", test)):
        r = r.astype(np.int64)
        r[lengths < 3] = -1
        splits[name] = r
    ds = Dataset("tiny", list(TINY_TITLES), items, offsets, np.arange(num_users, dtype=np.int64), splits,
                 TINY_SYSTEM, TINY_USER)
    ds.check()
    return ds


