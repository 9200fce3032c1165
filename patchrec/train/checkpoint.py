"""Checkpoints of a training run, written atomically, in one format for every world size.

``checkpoints/step-N/`` holds the full model (safetensors + config + tokenizer), ``trainer_state.pt`` (the
full AdamW state in ``optimizer.state_dict()`` layout, scheduler, RNG states, step) and ``state.json``;
``checkpoints/latest`` names the newest complete one. Under torchrun only rank 0 writes
(``patchrec.train.parallel`` gathers what FSDP shards).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchrec.model.decoder import PackedDecoder

STATE_FILE = "trainer_state.pt"
# Test hook (tests/test_crash.py): ``PATCHREC_KILL_AT=POINT:N[:RANK]`` makes the process SIGKILL itself the
# N-th time it reaches ``kill_point(POINT)`` (only on that torchrun rank when RANK is given), so that a test
# can land a hard kill exactly inside a step or a checkpoint write. Points: ``step`` (gradients accumulated,
# weights not yet updated) and ``checkpoint`` (the checkpoint's model files written to its temporary
# directory, the trainer state not yet). Unset (always, outside tests), ``kill_point`` is one lookup.
KILL_ENV = "PATCHREC_KILL_AT"
KILL_POINTS = ("step", "checkpoint")
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here when ``PATCHREC_KILL_AT`` names this point and count (see ``KILL_ENV``)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    count, _, rank = rest.partition(":")
    if point not in KILL_POINTS or not count.isdigit() or not (rank == "" or rank.isdigit()):
        raise ValueError(f"{KILL_ENV}={spec!r}: expected POINT:N[:RANK] with POINT one of {KILL_POINTS}")
    if point != name or (rank and rank != os.environ.get("RANK", "0")):
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- checkpoints -------------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (``checkpoints/latest``), or None."""
    pointer = Path(out) / "checkpoints" / "latest"
    if pointer.is_file():
        path = pointer.parent / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` directory to ``final`` (a rename: readers see old or new, never half)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model_dir(
    path: Path, model: PackedDecoder, tokenizer, extra: Callable[[Path], None] | None = None,
    dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """Model (its tensors cast to ``dtype`` when given) + tokenizer (and whatever ``extra`` writes into the
    directory), written to a temporary directory first and then renamed to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, dtype=dtype)
    tokenizer.save_pretrained(str(tmp))
    if extra is not None:
        extra(tmp)
    _publish_dir(tmp, path)


def rng_states() -> dict[str, Any]:
    # numpy's state is stored as plain values and a tensor so that the checkpoint loads with
    # torch.load(weights_only=True): no pickled objects are ever unpickled.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    out: Path, model, tokenizer, optimizer_state: dict, scheduler, position: dict[str, int], keep: int,
    info: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write ``checkpoints/step-N`` atomically, point ``checkpoints/latest`` at it, drop old checkpoints.

    ``model`` is a plain ``PackedDecoder`` and ``optimizer_state`` the full ``optimizer.state_dict()``-layout
    state (``patchrec.train.parallel``); ``info`` goes into ``state.json`` only (e.g. the world size).
    Everything goes into a hidden temporary directory first; only a complete directory is renamed into place
    and only then does ``latest`` move, so a crash at any point leaves the previous checkpoint usable."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position['step']:06d}"
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states(),
             "position": dict(position)}

    def write_state(tmp: Path) -> None:
        kill_point("checkpoint")
        torch.save(state, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps(dict(position) | (info or {})) + "\n")

    save_model_dir(root / name, model, tokenizer, extra=write_state)
    write_atomic_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # Tensors, numbers, strings and containers only (see rng_states): no arbitrary unpickling.
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        # torch's own messages (a zip reader's internals, or advice to turn off weights_only) name no file.
        raise ValueError(f"{path}: not a readable trainer state (truncated or corrupted?): "
                         f"{type(exc).__name__}") from exc


__all__ = ["KILL_ENV", "STATE_FILE", "kill_point", "latest_checkpoint", "load_trainer_state", "rng_states",
           "save_checkpoint", "save_model_dir", "set_rng_states"]
