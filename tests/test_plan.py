"""Compression plans: per-n definitions (property tests) and the vectorised batch form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchrec.batching.plan import (
    DROP,
    ITEM,
    PAD,
    SESSION,
    TEXT,
    Plan,
    dropout_plan,
    make_planner,
    pft_i_plan,
    pft_s_plan,
    pretrain_plans,
    stack_plans,
    vanilla_plan,
)

ns = st.integers(min_value=0, max_value=130)


def check_groups(plan: Plan) -> None:
    """Groups: -1 exactly for DROP, 0..P-1 over kept items, contiguous, non-decreasing; sessions share."""
    kept = plan.kinds != DROP
    assert np.all((plan.group == -1) == ~kept)
    g = plan.group[kept]
    if len(g):
        assert g[0] == 0 and np.all(np.diff(g) >= 0) and np.all(np.diff(g) <= 1)
        shared = np.flatnonzero(np.diff(g) == 0)
        assert np.all(plan.kinds[kept][shared] == SESSION) and np.all(plan.kinds[kept][shared + 1] == SESSION)


@given(n=ns)
def test_vanilla(n):
    plan = vanilla_plan(n)
    assert len(plan) == n and np.all(plan.kinds == TEXT) and plan.num_pieces == n
    check_groups(plan)


@given(n=ns, k=st.integers(0, 12))
def test_pft_i(n, k):
    plan = pft_i_plan(n, k)
    text = min(n, k)
    assert np.all(plan.kinds[n - text :] == TEXT) and np.all(plan.kinds[: n - text] == ITEM)
    assert plan.num_pieces == n
    check_groups(plan)


@given(n=ns, g=st.integers(1, 25))
def test_pft_s(n, g):
    plan = pft_s_plan(n, g)
    kinds = plan.kinds
    n_text, n_item = min(n, g), min(max(n - g, 0), g)
    older = max(n - 2 * g, 0)
    assert np.all(kinds[n - n_text :] == TEXT)
    assert np.all(kinds[n - n_text - n_item : n - n_text] == ITEM)
    assert np.all(kinds[:older] == SESSION)
    check_groups(plan)
    sessions = plan.group[:older]
    sizes = np.bincount(sessions) if older else np.zeros(0, int)
    if older:
        # Every session has g items except the oldest, which holds the remainder on its own.
        assert np.all(sizes[1:] == g)
        assert sizes[0] == (older % g or g)
        assert len(sizes) == -(-older // g)
    assert plan.num_pieces == len(sizes) + n_item + n_text


def test_pft_s_examples():
    # 17 items, G = 5: 5 text, 5 item patches, 7 older items = the oldest session holds the remainder 2,
    # then a full session of 5.
    plan = pft_s_plan(17, 5)
    assert plan.kinds.tolist() == [SESSION] * 7 + [ITEM] * 5 + [TEXT] * 5
    assert plan.group.tolist() == [0] * 2 + [1] * 5 + list(range(2, 12))
    plan = pft_s_plan(23, 5)  # 13 older: sessions of 3 (oldest), 5 and 5
    assert plan.group[:13].tolist() == [0] * 3 + [1] * 5 + [2] * 5


@settings(deadline=None)
@given(n=ns, p=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_random_plans(n, p, seed):
    rng = np.random.default_rng(seed)
    text, comp = pretrain_plans(n, p, rng)
    assert np.all(text.kinds == TEXT)
    assert set(comp.kinds.tolist()) <= {TEXT, ITEM}
    check_groups(comp)
    drop = dropout_plan(n, p, rng)
    assert set(drop.kinds.tolist()) <= {TEXT, DROP}
    check_groups(drop)


@given(n=ns)
def test_random_plan_extremes(n):
    rng = np.random.default_rng(0)
    assert np.all(pretrain_plans(n, 0.0, rng)[1].kinds == TEXT)
    assert np.all(dropout_plan(n, 0.0, rng).kinds == TEXT)
    assert np.all(pretrain_plans(n, 1.0, rng)[1].kinds == ITEM)
    assert np.all(dropout_plan(n, 1.0, rng).kinds == DROP)


def test_random_rate_is_p():
    rng = np.random.default_rng(1)
    kinds = np.concatenate([pretrain_plans(100, 0.3, rng)[1].kinds for _ in range(200)])
    assert abs((kinds == ITEM).mean() - 0.3) < 0.02


def test_deterministic_plans_are_cached_and_read_only():
    assert pft_i_plan(30, 5) is pft_i_plan(30, 5)
    with pytest.raises(ValueError):
        pft_i_plan(30, 5).kinds[0] = TEXT


@pytest.mark.parametrize("name", ["vanilla", "pft-i", "pft-s"])
def test_batch_equals_per_n(name):
    planner = make_planner(name, k=3, g=4)
    lengths = np.array([0, 1, 3, 4, 8, 9, 12, 13, 37, 50])
    (batch,) = planner.plan_batch(lengths, width=55)
    expected = stack_plans([planner.plan(int(n))[0] for n in lengths], width=55)
    assert np.array_equal(batch.kinds, expected.kinds) and np.array_equal(batch.group, expected.group)
    assert np.all((batch.kinds == PAD) == (np.arange(55) >= lengths[:, None]))


@pytest.mark.parametrize("name", ["pretrain", "dropout"])
def test_batch_random_plans(name):
    lengths = np.array([1, 5, 20, 60, 100])
    planner = make_planner(name, p=0.5)
    views = planner.plan_batch(lengths, np.random.default_rng(0), width=100)
    assert len(views) == planner.views
    again = planner.plan_batch(lengths, np.random.default_rng(0), width=100)
    # Seeded = reproducible.
    assert all(np.array_equal(a.kinds, b.kinds) for a, b in zip(views, again, strict=True))
    # Both random plans give two views (the dropout ablation used to give one): all text, then the other.
    assert len(views) == 2
    assert np.all(views[0].kinds[views[0].kinds != PAD] == TEXT)
    one = planner.plan(7, np.random.default_rng(1))
    assert len(one) == 2 and np.all(one[0].kinds == TEXT)
    comp = views[-1]
    for b, n in enumerate(lengths):
        check_groups(Plan(comp.kinds[b, :n], comp.group[b, :n]))
        assert np.all(comp.kinds[b, n:] == PAD) and np.all(comp.group[b, n:] == -1)
    # Curriculum (p=None): progress 0 -> all text, progress 1 -> all compressed.
    curriculum = make_planner(name)
    views = curriculum.plan_batch(lengths, np.random.default_rng(0), progress=np.array([0, 0, 1, 1, 1.0]))
    kind = ITEM if name == "pretrain" else DROP
    assert np.all(views[-1].kinds[:2][views[-1].kinds[:2] != PAD] == TEXT)
    assert np.all(views[-1].kinds[2:][views[-1].kinds[2:] != PAD] == kind)
    with pytest.raises(ValueError, match="progress"):
        curriculum.plan_batch(lengths, np.random.default_rng(0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="plan name"):
        make_planner("pft-x")
    with pytest.raises(ValueError, match="g"):
        pft_s_plan(10, 0)
    with pytest.raises(ValueError, match="p"):
        make_planner("dropout", p=1.5)
    with pytest.raises(ValueError, match="rng"):
        make_planner("dropout", p=0.5).plan(5)
    with pytest.raises(ValueError, match="lengths"):
        make_planner("vanilla").plan_batch(np.array([5]), width=4)
