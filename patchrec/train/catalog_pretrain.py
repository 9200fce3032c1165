"""A catalog-text stage: a causal-LM objective over short texts about the catalog, so that a random-init
model's token embeddings mean something before item patches (means of a title's token embeddings) are used.

This stands in for an LLM's pre-training on the tiny demo model: the texts are lists of titles that belong
together (the same topic of the synthetic generator: ``Echoes of the Silent Harbor ; The Tide and the Reef ;
...``), so title words of one topic end up with related embeddings and a patch (their mean) carries the topic.
Plain transformers on padded batches (the texts are short); the result is a model directory (model +
tokenizer) that any training stage accepts as ``init``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchrec.batching.tokens import load_tokenizer
from patchrec.model.decoder import PackedDecoder, llama_config
from patchrec.train.checkpoint import save_model_dir
from patchrec.train.parallel import param_groups


@dataclass
class CatalogTextConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # texts per step
    titles_per_text: int = 6  # same-topic titles in one text
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class CatalogTextResult:
    model_dir: Path
    seconds: float
    final_loss: float
    tokens_per_s: float


def catalog_texts(titles: list[str], topic_of_item: np.ndarray, count: int, per_text: int,
                  rng: np.random.Generator) -> list[str]:
    """``count`` texts, each ``per_text`` distinct titles of one topic joined by `` ; ``."""
    topics = np.unique(topic_of_item)
    members = {int(t): np.flatnonzero(topic_of_item == t) for t in topics}
    texts = []
    for topic in rng.choice(topics, size=count):
        pool = members[int(topic)]
        pick = rng.choice(pool, size=min(per_text, len(pool)), replace=False)
        texts.append(" ; ".join(titles[i] for i in pick))
    return texts


def train_catalog_text(titles: list[str], topic_of_item: np.ndarray, tokenizer_dir: str | Path,
                       out: str | Path, *, preset: str = "tiny", config: CatalogTextConfig | None = None,
                       ) -> CatalogTextResult:  # fmt: skip
    """Train a ``preset`` Llama from random init on catalog texts; writes ``out/model`` (+ tokenizer)."""
    from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

    config = config or CatalogTextConfig()
    tokenizer = load_tokenizer(tokenizer_dir)
    rng = np.random.default_rng(config.seed)
    count = config.steps * config.batch_size
    texts = catalog_texts(titles, topic_of_item, count, config.titles_per_text, rng)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = [tokenizer.encode(t, add_special_tokens=False) + end for t in texts]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        lm = LlamaForCausalLM(llama_config(preset, len(tokenizer)))
    lm.set_attn_implementation("sdpa")
    lm.train()
    groups, _ = param_groups(lm, config.weight_decay)  # the training stages' AdamW groups
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    # The training stages' schedule (patchrec.train.loop): linear warmup, then cosine decay to 0.
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps),
                                                config.steps)

    start = time.perf_counter()
    tokens = 0
    loss_value = float("nan")
    for step in range(config.steps):
        batch = encoded[step * config.batch_size:(step + 1) * config.batch_size]
        width = max(len(x) for x in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, x in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        tokens += int(mask.sum())
        loss_value = float(loss.detach())
    seconds = time.perf_counter() - start
    model_dir = Path(out) / "model"
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    save_model_dir(model_dir, PackedDecoder(lm.eval()), tokenizer)
    return CatalogTextResult(model_dir, seconds, loss_value, tokens / max(seconds, 1e-9))
