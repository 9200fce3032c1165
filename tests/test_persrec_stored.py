"""PerSRec states as safetensors bytes and batched again (``patchrec.persrec.stored``): a round trip keeps
every tensor bit for bit, users read against their concatenated stored states score exactly as each alone
and as the full forward, for every layout on SASRec and HSTU; malformed bytes are ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchrec.baselines import HSTU, HSTUConfig, SASRec, SASRecConfig
from patchrec.baselines.train import cu_seqlens_of, score_last
from patchrec.persrec.sequence import build_state, read_recent, split_for
from patchrec.persrec.stored import concat_states, split_states, state_from_bytes, state_to_bytes

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

NUM_ITEMS = 29
LAYOUTS = {
    "segments": dict(persrec_tokens=3, persrec_segment=4, max_len=23),
    "window": dict(persrec_tokens=3, persrec_layout="window", persrec_window=7, persrec_recent=4, max_len=11),
    "rolling": dict(persrec_tokens=3, persrec_layout="rolling", persrec_segment=4, max_len=23),
}


def build(name: str, layout: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(hidden=16, num_blocks=2, num_heads=2, dropout=0.0) | LAYOUTS[layout]
    if name == "sasrec":
        return SASRec(NUM_ITEMS, SASRecConfig(**kw)).eval()
    return HSTU(NUM_ITEMS, HSTUConfig(**kw)).eval()


def histories(layout: str, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    longest = 11 if layout == "window" else 23
    # one item, exactly one segment + 1, odd lengths, the longest the layout reads
    lengths = [1, 5, 9, longest, 13 if layout != "window" else 10, 2]
    return [rng.integers(0, NUM_ITEMS, size=n) for n in lengths]


def states_of(model, hists):
    """Each user's state built alone, and the recent items each reads."""
    states, recent = [], []
    for h in hists:
        old, rec = split_for(model.persrec, np.array([len(h)]))
        with torch.no_grad():
            states.append(build_state(model, torch.from_numpy(h[: int(old[0])]), old))
        recent.append(h[int(old[0]) :])
    return states, recent


def assert_same_state(a, b):
    assert type(a) is type(b)
    if hasattr(a, "memory"):
        assert torch.equal(a.memory, b.memory) and np.array_equal(a.folded, b.folded)
        return
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))
    assert torch.equal(a.positions, b.positions) and np.array_equal(a.next_position, b.next_position)
    assert np.array_equal(a.cu_state, b.cu_state)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stored_states_round_trip_and_score_in_one_batch(name, layout):
    model = build(name, layout)
    hists = histories(layout)
    states, recent = states_of(model, hists)
    stored = [state_from_bytes(state_to_bytes(s)) for s in states]
    for a, b in zip(states, stored, strict=True):
        assert_same_state(a, b)
    batched = concat_states(stored)
    assert batched.num_users == len(hists)
    lengths = np.array([len(r) for r in recent])
    with torch.no_grad():
        items = torch.from_numpy(np.concatenate(recent))
        together = model.logits(read_recent(model, batched, items, lengths))
        for b, (state, rec) in enumerate(zip(states, recent, strict=True)):
            alone = model.logits(read_recent(model, state, torch.from_numpy(rec), np.array([len(rec)])))[0]
            torch.testing.assert_close(together[b], alone, rtol=1e-5, atol=1e-5)
        # and the cached path equals the full forward over the whole history
        full = score_last(model, torch.from_numpy(np.concatenate(hists)),
                          cu_seqlens_of(np.array([len(h) for h in hists])))  # fmt: skip
    torch.testing.assert_close(together, full, rtol=1e-4, atol=1e-4)
    # split gives the users back unchanged
    for a, b in zip(split_states(batched), stored, strict=True):
        assert_same_state(a, b)


def test_malformed_state_bytes_are_value_errors():
    model = build("sasrec", "segments")
    states, _ = states_of(model, histories("segments")[3:4])
    good = state_to_bytes(states[0])
    for bad in (b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", good[:40], b"x" * 64):
        with pytest.raises(ValueError, match="state bytes"):
            state_from_bytes(bad)
    from safetensors.torch import save

    other = save({"w": torch.ones(2)}, metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a patchrec.persrec.state"):
        state_from_bytes(other)
    with pytest.raises(ValueError, match="one-user"):
        state_to_bytes(concat_states(states + states))
    with pytest.raises(ValueError, match="not a PerSRec state"):
        concat_states([object()])
