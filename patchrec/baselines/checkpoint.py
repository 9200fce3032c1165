"""Saving and loading a trained ID baseline: ``model.safetensors`` (weights; popularity: its counts) beside
``config.json`` (the run's resolved configuration: model name, catalog size, model settings). No pickle: a
model directory can be loaded by any later tool (``patchrec serve``, the PerSRec studies in ``benches/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from patchrec.baselines.gru4rec import GRU4Rec, GRU4RecConfig
from patchrec.baselines.hstu import HSTU, HSTUConfig
from patchrec.baselines.popularity import Popularity
from patchrec.baselines.sasrec import SASRec, SASRecConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MODELS = {"sasrec": (SASRec, SASRecConfig), "hstu": (HSTU, HSTUConfig), "gru4rec": (GRU4Rec, GRU4RecConfig)}


def save_baseline(model, config: dict[str, Any], out: str | Path) -> None:
    """Write ``model`` (a neural baseline or ``Popularity``) and its run ``config`` (must name ``model`` and
    ``num_items``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "model" not in config or "num_items" not in config:
        raise ValueError("config must record 'model' and 'num_items'")
    if isinstance(model, Popularity):
        tensors = {"counts": torch.from_numpy(model.counts)}
    else:
        tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")


def load_baseline(path: str | Path):
    """(model in eval mode, config dict) of a directory written by ``save_baseline``."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not a patchrec baseline directory (no {name})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / CONFIG}: not valid JSON ({err})") from err
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types on a truncated or corrupted file
        raise ValueError(f"{path / WEIGHTS}: cannot be read ({err})") from err
    name = config.get("model")
    if name == "popularity":
        return Popularity(tensors["counts"].numpy().astype(np.int64)), config
    if name not in MODELS:
        raise ValueError(f"{path / CONFIG}: model {name!r} is not one of {sorted(MODELS) + ['popularity']}")
    cls, config_cls = MODELS[name]
    model = cls(int(config["num_items"]), config_cls(**config["model_config"]))
    model.load_state_dict(tensors)
    return model.eval(), config
