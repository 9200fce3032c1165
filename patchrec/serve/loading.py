"""Which model a ``patchrec serve --model DIR`` is, and its ``Scorer``: a ``patchrec baseline`` directory
(``config.json`` naming the model + ``model.safetensors``) or an LLM (``patchrec.serve.llm``).

The fingerprint identifies the model a stored PerSRec state was made with: sha256 of the weights file and of
the configuration (canonical JSON), so a retrained model, or the same weights with other settings, never
reads another model's states.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from patchrec.baselines.checkpoint import CONFIG, MODELS, WEIGHTS, load_baseline
from patchrec.serve.config import DEFAULT_REFOLD_EVERY
from patchrec.serve.scorers import PersrecScorer, PopularityScorer, Scorer, SequenceScorer

BASELINES = (*MODELS, "popularity")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(weights: Path, config: dict[str, Any]) -> str:
    """sha256 over the weights file and the canonical JSON of ``config`` (first 32 hex digits)."""
    digest = hashlib.sha256()
    digest.update(file_sha256(weights).encode())
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:32]


def baseline_kind(path: str | Path) -> str | None:
    """The baseline model named by ``path/config.json`` when ``path`` is a ``patchrec baseline`` output
    directory, else None (e.g. an LLM run)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        return None
    try:
        name = json.loads((path / CONFIG).read_text()).get("model")
    except (json.JSONDecodeError, AttributeError):
        return None
    return name if name in BASELINES else None


def baseline_scorer(
    path: str | Path, *, refold_every: int = DEFAULT_REFOLD_EVERY, device: str | torch.device = "cpu"
) -> Scorer:
    """The scorer of a ``patchrec baseline`` directory: popularity, a sequence model, or one with PerSRec."""
    path = Path(path)
    model, config = load_baseline(path)
    fp = fingerprint(path / WEIGHTS, config)
    name = config["model"]
    if name == "popularity":
        return PopularityScorer(model, fp)
    model = model.to(device)
    if getattr(model, "persrec", None) is not None and model.persrec.on:
        return PersrecScorer(name, model, fp, refold_every=refold_every)
    # GRU4Rec has no max_len of its own: the run's history length (the L it was evaluated with)
    history = model.config.max_len if hasattr(model.config, "max_len") else int(config.get("max_items", 100))
    return SequenceScorer(name, model, int(history), fp)


__all__ = ["BASELINES", "baseline_kind", "baseline_scorer", "file_sha256", "fingerprint"]
