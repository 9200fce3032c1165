"""PerSRec states kept outside the process (a server's database) and batched again: one user's state as
safetensors bytes, and many users' states concatenated into one batched state (and split back), so that a
batch of users is read against their stored states in one forward (``read_recent``).

Both state types are covered: ``PersrecState`` (segments and window layouts: every layer's key/value rows,
their positions, the next row's position) and ``RollingState`` (the rolling layout: k memory vectors and the
segments folded so far). The bytes are plain safetensors (no pickle) with a small metadata header naming the
format; reading checks the header and the tensors' shapes and raises ValueError on anything else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from patchrec.persrec.rolling import RollingState
from patchrec.persrec.state import PersrecState

FORMAT = "patchrec.persrec.state"
VERSION = "1"
KINDS = ("kv", "rolling")  # PersrecState (segments, window), RollingState (rolling)


def state_kind(state) -> str:
    if isinstance(state, PersrecState):
        return "kv"
    if isinstance(state, RollingState):
        return "rolling"
    raise ValueError(f"not a PerSRec state: {type(state).__name__}")


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def concat_states(states: Sequence):
    """One batched state of the users of ``states`` (each a state of any number of users, all of one type and
    model), in order: user ``b`` of the result is the ``b``-th user counted across ``states``."""
    if not states:
        raise ValueError("concat_states needs at least one state")
    kind = state_kind(states[0])
    if any(state_kind(s) != kind for s in states):
        raise ValueError("concat_states: states of different types (PersrecState and RollingState)")
    if kind == "rolling":
        memory = torch.cat([s.memory for s in states])
        return RollingState(memory, np.concatenate([s.folded for s in states]).astype(np.int64))
    layers = len(states[0].keys)
    if any(len(s.keys) != layers or len(s.values) != layers for s in states):
        raise ValueError("concat_states: states with different numbers of layers")
    rows = np.concatenate([s.rows() for s in states])
    return PersrecState(
        [torch.cat([s.keys[i] for s in states]) for i in range(layers)],
        [torch.cat([s.values[i] for s in states]) for i in range(layers)],
        torch.cat([s.positions for s in states]),
        _offsets(rows),
        np.concatenate([s.next_position for s in states]).astype(np.int64),
    )


def split_states(state) -> list:
    """The users of a batched state as one-user states (copies: they share no memory with ``state``)."""
    if state_kind(state) == "rolling":
        return [RollingState(state.memory[b : b + 1].clone(), state.folded[b : b + 1].copy())
                for b in range(state.num_users)]  # fmt: skip
    out = []
    for b in range(state.num_users):
        lo, hi = int(state.cu_state[b]), int(state.cu_state[b + 1])
        out.append(PersrecState(
            [k[lo:hi].clone() for k in state.keys], [v[lo:hi].clone() for v in state.values],
            state.positions[lo:hi].clone(), np.array([0, hi - lo], dtype=np.int64),
            state.next_position[b : b + 1].copy(),
        ))  # fmt: skip
    return out


def state_to_bytes(state) -> bytes:
    """safetensors bytes of a one-user state (``split_states`` gives those)."""
    kind = state_kind(state)
    if state.num_users != 1:
        raise ValueError(f"state_to_bytes takes a one-user state, got {state.num_users} users")
    if kind == "rolling":
        tensors = {"memory": state.memory, "folded": torch.from_numpy(state.folded.astype(np.int64))}
    else:
        tensors = {f"keys.{i}": k for i, k in enumerate(state.keys)}
        tensors.update({f"values.{i}": v for i, v in enumerate(state.values)})
        tensors["positions"] = state.positions
        tensors["next_position"] = torch.from_numpy(state.next_position.astype(np.int64))
    # safetensors wants contiguous CPU tensors that share no storage
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION, "kind": kind}
    if kind == "kv":
        meta["layers"] = str(len(state.keys))
    return save_bytes(tensors, metadata=meta)


def _metadata(data: bytes) -> dict[str, str]:
    # The header is an 8-byte little-endian length then JSON (the safetensors format); the tensors are
    # parsed by safetensors itself below.
    if len(data) < 8:
        raise ValueError("state bytes: too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("state bytes: safetensors header runs past the end")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"state bytes: unreadable safetensors header ({err})") from err
    return header.get("__metadata__") or {}


def state_from_bytes(data: bytes, device: torch.device | str = "cpu"):
    """The one-user state written by ``state_to_bytes`` (on ``device``); ValueError for other bytes."""
    meta = _metadata(data)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("kind") not in KINDS:
        raise ValueError(f"state bytes: not a {FORMAT} v{VERSION} state (metadata {meta})")
    try:
        tensors = load_bytes(data)
    except SafetensorError as err:
        raise ValueError(f"state bytes: cannot be read ({err})") from err
    tensors = {name: t.to(device) for name, t in tensors.items()}
    if meta["kind"] == "rolling":
        memory, folded = tensors.get("memory"), tensors.get("folded")
        if memory is None or folded is None or memory.ndim != 3 or len(memory) != 1 or folded.shape != (1,):
            raise ValueError("state bytes: a rolling state needs memory [1, k, d] and folded [1]")
        return RollingState(memory, folded.cpu().numpy().astype(np.int64))
    layers = int(meta.get("layers", "-1"))
    names = {f"{part}.{i}" for part in ("keys", "values") for i in range(layers)}
    names |= {"positions", "next_position"}
    if layers < 0 or set(tensors) != names:
        raise ValueError(f"state bytes: expected tensors {sorted(names)}, got {sorted(tensors)}")
    keys = [tensors[f"keys.{i}"] for i in range(layers)]
    values = [tensors[f"values.{i}"] for i in range(layers)]
    rows = tensors["positions"].shape[0]
    if any(t.ndim != 3 or len(t) != rows for t in keys + values) or tensors["next_position"].shape != (1,):
        raise ValueError("state bytes: keys/values must be [S, H, D], S = len(positions); next_position [1]")
    return PersrecState(keys, values, tensors["positions"], np.array([0, rows], dtype=np.int64),
                        tensors["next_position"].cpu().numpy().astype(np.int64))  # fmt: skip


__all__ = ["concat_states", "split_states", "state_from_bytes", "state_kind", "state_to_bytes"]
