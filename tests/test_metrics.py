"""Whole-catalog ranks, tie rules, history masking, HR/NDCG and the results file, on hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch

from patchrec.data.dataset import Dataset, make_samples
from patchrec.eval.metrics import (
    full_ranks,
    history_mask_pairs,
    rank_samples,
    ranking_metrics,
    write_results,
)

# Three users x five items. Row 0: target 2 (score 0.5) is beaten by item 1 and tied with item 3.
# Row 1: target 3 ties with items 1, 2, 4 and is beaten by item 0. Row 2: target 0 is the best.
SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.5, 0.5, 0.2],
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.3, 0.2, 0.1, 0.0, -1.0],
    ]
)
TARGETS = torch.tensor([2, 3, 0])


@pytest.mark.parametrize(
    "ties, expected",
    [("pessimistic", [2, 4, 0]), ("stable", [1, 3, 0]), ("optimistic", [1, 1, 0])],
)
def test_full_ranks_hand_example(ties, expected):
    assert full_ranks(SCORES, TARGETS, ties=ties).tolist() == expected


def test_stable_rule_matches_a_stable_sort():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (64, 9), generator=gen).float()  # few distinct values: many ties
    targets = torch.randint(0, 9, (64,), generator=gen)
    order = torch.sort(-scores, dim=1, stable=True).indices
    expected = (order == targets[:, None]).float().argmax(dim=1)
    assert torch.equal(full_ranks(scores, targets, ties="stable"), expected)
    pess = full_ranks(scores, targets, ties="pessimistic")
    opt = full_ranks(scores, targets, ties="optimistic")
    assert torch.all(opt <= expected) and torch.all(expected <= pess) and torch.any(opt < pess)


def test_masking_skips_history_but_never_the_target():
    # row 0 masks items 1 (the one above the target) and 2 (the target itself, which must stay)
    rows, items = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0])
    ranks = full_ranks(SCORES, TARGETS, mask_rows=rows, mask_items=items)
    assert ranks.tolist() == [1, 3, 0]  # row 1: item 0 masked, ties 1, 2, 4 remain (pessimistic)
    assert SCORES[0, 1] == 0.9  # input untouched


def test_ranking_metrics_hand_example():
    m = ranking_metrics(np.array([2, 4, 0]), ks=(1, 3, 5))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["NDCG@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(4) + 1.0) / 3)
    assert m["HR@5"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(6) + 1.0) / 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: full_ranks(SCORES[0], TARGETS), "scores"),
        (lambda: full_ranks(SCORES, TARGETS[:2]), "targets"),
        (lambda: full_ranks(SCORES, torch.tensor([0, 1, 5])), "targets"),
        (lambda: full_ranks(SCORES, TARGETS, ties="random"), "ties"),
        (lambda: full_ranks(SCORES, TARGETS, mask_rows=torch.tensor([0])), "mask_rows"),
        (lambda: full_ranks(torch.full((3, 5), float("nan")), TARGETS), "NaN"),
        (lambda: ranking_metrics(np.array([-1])), "ranks"),
        (lambda: ranking_metrics(np.array([1]), ks=(0,)), "ks"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def tiny_dataset() -> Dataset:
    # user 0: items 0 1 2 3 4 5 (test = positions 4..5); user 1: items 5 4 3 2 (test = position 3)
    items = np.array([0, 1, 2, 3, 4, 5, 5, 4, 3, 2], dtype=np.int32)
    none = np.full((2, 2), -1, dtype=np.int64)
    ds = Dataset(
        name="tiny",
        titles=[f"t{i}" for i in range(7)],
        items=items,
        user_offsets=np.array([0, 6, 10]),
        user_ids=np.array([0, 1]),
        splits={"train": np.array([[0, 3], [0, 2]]), "val": none, "test": np.array([[4, 5], [3, 3]])},
        system_prompt="s",
        user_prompt="u [HISTORY_SEQUENCE]",
    )
    ds.check()
    return ds


def test_history_mask_pairs_use_the_whole_prefix():
    samples = make_samples(tiny_dataset(), "test", max_items=2)  # L=2 < prefix: the mask must go further
    rows, items = history_mask_pairs(samples, np.array([2, 0]))
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert items.tolist() == [5, 4, 3, 0, 1, 2, 3]


def test_rank_samples_batches_and_masks():
    ds = tiny_dataset()
    samples = make_samples(ds, "test", max_items=100)  # targets 4, 5 (user 0) and 2 (user 1)
    scores = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # item i scores 6 - i

    def score_fn(index):
        return scores.expand(len(index), -1)

    unmasked = rank_samples(score_fn, samples, batch_size=2)
    masked = rank_samples(score_fn, samples, mask_history=True, batch_size=2)
    assert unmasked.tolist() == [4, 5, 2]
    # user 0's earlier items 0..3 (and 4 before target 5) are masked; user 1's 5, 4, 3 rank below 2 anyway
    assert masked.tolist() == [0, 0, 2]


def test_write_results_round_trip(tmp_path):
    out = write_results(
        tmp_path / "sub" / "r.json",
        ranks=np.array([2, 4, 0]),
        mask_history=True,
        split="test",
        dataset="tiny",
        model="pop",
        config={"a": 1},
        ks=(1, 5),
        ties="stable",
    )
    data = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert data == out
    assert data["ranks"] == [2, 4, 0] and data["mask_history"] is True and data["ties"] == "stable"
    assert data["ks"] == [1, 5] and data["num_samples"] == 3 and data["config"] == {"a": 1}
    assert data["metrics"]["HR@1"] == pytest.approx(1 / 3)
