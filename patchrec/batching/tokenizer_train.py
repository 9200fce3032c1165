"""A small byte-level BPE trained on a catalog's titles, for runs without a pre-trained LLM (synthetic data,
the demo, tests): a random-init model needs a vocabulary, and a Llama-3 one (128k rows) would make the tiny
model's embedding table dominate its size and its training time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

BOS, EOS = "<s>", "</s>"


def train_title_tokenizer(
    titles: Sequence[str], out_dir: str | Path, vocab_size: int = 1000, extra_texts: Sequence[str] = ()
) -> Path:
    """Train a byte-level BPE on ``titles`` (+ ``extra_texts``, e.g. the prompt) and save it as a Hugging Face
    tokenizer directory with bos ``<s>`` and eos ``</s>`` (eos doubles as the answer's end-of-turn token,
    since the tokenizer has no chat template). Returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(titles) == 0:
        raise ValueError("titles must not be empty")
    if vocab_size < 258 + 2:
        # The byte alphabet alone takes 256 ids; below that BPE cannot represent every string.
        raise ValueError(f"vocab_size must be >= 260 (256 bytes + bos/eos + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(titles) + list(extra_texts), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return out
