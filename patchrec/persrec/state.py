"""The PerSRec key/value state (``PersrecState``) and running rows against it.

A model opts in with a ``persrec: PersrecConfig`` attribute (``tokens`` 0 = off) and two methods:

- ``embed_rows(items, rows: ItemRows, memory=None) -> x [R, d]``: input rows, item embeddings at
  ``rows.item_row``, the learnable T vectors at ``rows.token_row`` and carried memory vectors at
  ``rows.memory_row`` (the rolling layout), plus whatever position signal the model uses;
- ``run_layers(x, positions, layout, state) -> (hidden [R, d], keys, values)``: every layer under
  ``segmented_attention(..., context_k=state.keys[l], context_v=state.values[l])``; ``keys`` / ``values`` are
  each layer's [R, H, Dh] key/value rows (what the state keeps of the carried rows). A model whose attention
  reads key positions (HSTU's relative bias) takes them from ``state.positions`` and ``positions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchrec.batching.blocks import BlockLayout, offsets
from patchrec.data.dataset import ragged_arange
from patchrec.persrec.attention import block_state
from patchrec.persrec.layout import ItemRows


@dataclass
class PersrecState:
    """Per-user PerSRec state of B users: every layer's keys/values at the carried rows folded so far (the
    T-token rows; on the LLM also the prompt prefix, keys after RoPE: ``patchrec.persrec.llm``).

    User ``b``'s rows are ``cu_state[b] : cu_state[b+1]`` of every tensor; ``next_position[b]`` is the
    position of the user's next row (the rows consumed so far), so that a later block continues the row
    numbering of the full forward.
    """

    keys: list[torch.Tensor]  # per layer [S, Hkv, Dh]
    values: list[torch.Tensor]  # per layer [S, Hkv, Dh]
    positions: torch.Tensor  # int64 [S]: the rows' positions
    cu_state: np.ndarray  # int64 [B+1]
    next_position: np.ndarray  # int64 [B]

    @property
    def num_users(self) -> int:
        return len(self.next_position)

    def rows(self) -> np.ndarray:
        return np.diff(self.cu_state)

    def nbytes(self) -> np.ndarray:
        """Bytes of each user's state (keys and values of every layer), int64 [B]."""
        per_row = sum(t[:1].nelement() * t.element_size() for t in self.keys + self.values)
        return self.rows() * per_row

    def select(self, users) -> PersrecState:
        """The state of ``users`` (indices into this state's users, in that order; repeats allowed)."""
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.num_users):
            raise ValueError(f"users must be indices in [0, {self.num_users}), got {users.tolist()}")
        rows = self.rows()[users]
        index = torch.as_tensor(np.repeat(self.cu_state[:-1][users], rows) + ragged_arange(rows),
                                device=self.positions.device)  # fmt: skip
        pick = lambda tensors: [t.index_select(0, index) for t in tensors]  # noqa: E731
        return PersrecState(pick(self.keys), pick(self.values), self.positions.index_select(0, index),
                            offsets(rows), self.next_position[users].copy())  # fmt: skip

    @classmethod
    def empty(cls, model, num_users: int, device: torch.device | str = "cpu") -> PersrecState:
        heads, head_dim = model.kv_shape
        layers = model.num_layers
        blank = lambda: torch.zeros(0, heads, head_dim, device=device)  # noqa: E731
        return cls(
            [blank() for _ in range(layers)], [blank() for _ in range(layers)],
            torch.zeros(0, dtype=torch.long, device=device), np.zeros(num_users + 1, dtype=np.int64),
            np.zeros(num_users, dtype=np.int64),
        )  # fmt: skip


def forward_rows(
    model, items: torch.Tensor, rows: ItemRows, state: PersrecState | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run ``model`` on ``rows`` (optionally continuing ``state``): hidden [R, d] and per-layer k/v rows."""
    device = items.device
    layout = rows.layout.to(device)
    positions = torch.from_numpy(rows.positions).to(device)
    x = model.embed_rows(items, rows)
    return model.run_layers(x, positions, layout, state)


def extend_state(
    state: PersrecState, layout: BlockLayout, keys, values, positions: torch.Tensor, rows_per_user: np.ndarray
) -> PersrecState:
    """``state`` extended by the carried rows of a batch run against it (``layout.state_index``)."""
    return PersrecState(
        [block_state(k, layout, ck) for k, ck in zip(keys, state.keys, strict=True)],
        [block_state(v, layout, cv) for v, cv in zip(values, state.values, strict=True)],
        block_state(positions, layout, state.positions),
        layout.cu_state.numpy().copy(),
        state.next_position + rows_per_user,
    )
