"""Raw MovieLens preprocessing: parsing, filters, title normalisation, the global timestamp split, and the
comparison with the PatchRec release on raw ML-100K."""

import numpy as np
import pytest
from conftest import shared_path

from patchrec.data.dataset import SPLITS
from patchrec.data.interactions import global_time_split
from patchrec.data.movielens import (
    detect_format,
    load_movielens,
    normalize_title,
    read_movies,
)
from patchrec.data.release import load_release, read_id2title


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Toy Story (1995)", "Toy Story"),
        ("Usual Suspects, The (1995)", "The Usual Suspects"),
        ("Bug's Life, A (1998)", "A Bug's Life"),
        ("Affair to Remember, An (1957)", "An Affair to Remember"),
        ("Seven (Se7en) (1995)", "Seven"),
        ("Postman, The (Postino, Il) (1994)", "The Postman"),
        ("Postino, Il (1994)", "Postino, Il"),
        ("'burbs, The (1989)", "The burbs"),
        ("'Til There Was You (1997)", "Til There Was You"),
        ("unknown", "unknown"),
        ("Free Willy 2: The Adventure Home (1995)", "Free Willy 2: The Adventure Home"),
    ],
)
def test_normalize_title(raw, expected):
    assert normalize_title(raw) == expected


def test_global_time_split_keeps_ties_in_the_earlier_split():
    # 100 interactions: cuts after 96 and 98; the timestamp at position 95 repeats at 96 and 97.
    ts = np.arange(100)
    ts[96:98] = ts[95]
    labels = global_time_split(np.random.default_rng(0).permutation(ts))
    assert np.bincount(labels, minlength=3).tolist() == [98, 0, 2]
    plain = global_time_split(np.arange(100))
    assert np.bincount(plain).tolist() == [96, 2, 2]
    assert global_time_split(np.arange(3)).tolist() == [0, 0, 2]  # 3*48//50 = 2, 3*49//50 = 2


def write_ml1m(root, ratings, movies=None):
    root.mkdir(parents=True, exist_ok=True)
    movies = movies or [
        "1::Toy Story (1995)::Animation",
        "2::Jumanji (1995)::Adventure",
        "4::Waiting to Exhale (1995)::Comedy",
        "5::City of Lost Children, The (1995)::Sci-Fi",
    ]
    (root / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    (root / "ratings.dat").write_text("".join(r + "\n" for r in ratings), encoding="latin-1")
    return root


ML1M_RATINGS = [
    # user::movie::rating::timestamp, file order is not time order
    "7::5::5::300",
    "7::1::4::100",
    "7::2::3::150",
    "7::4::4::100",
    "3::1::5::200",
    "3::2::4::250",
    "3::4::4::400",
    "3::5::2::50",
]


def test_ml1m_fixture(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", ML1M_RATINGS)
    assert detect_format(root) == "ml-1m"
    ds, movie_ids = load_movielens(root)
    assert movie_ids.tolist() == [1, 2, 4, 5]  # gap at 3: dataset ids are ranks, release ids movie - 1
    assert ds.titles == ["Toy Story", "Jumanji", "Waiting to Exhale", "The City of Lost Children"]
    # users in order of first kept rating; ratings < 4 dropped; ties (t=100) by item id
    assert ds.user_ids.tolist() == [0, 1]
    assert ds.user_items(0).tolist() == [0, 2, 3]  # user 7: movies 1, 4 (t=100), 5 (t=300)
    assert ds.user_items(1).tolist() == [0, 1, 2]  # user 3: movies 1, 2, 4
    # 6 interactions: 6*48//50 = 5 -> train timestamp <= 300 (5th smallest), 6*49//50 = 5 -> val empty
    assert ds.splits["train"].tolist() == [[0, 2], [0, 1]]
    assert ds.splits["val"].tolist() == [[-1, -1], [-1, -1]]
    assert ds.splits["test"].tolist() == [[-1, -1], [2, 2]]


@pytest.mark.parametrize(
    "ratings, movies, message",
    [
        (["1::1::5::10", "1::2::5"], None, r"ratings.dat:2: expected 4 integers"),
        (["1::1::5::10", "1::x::5::11"], None, r"ratings.dat:2: expected 4 integers"),
        (["1::1::5::10", "", "1::2::5::11"], None, r"ratings.dat:2: expected 4 integers"),
        (["1::1::5::10", "1::3::5::11"], None, r"ratings.dat:2: movie 3 is not in movies.dat"),
        (["1::1::5::10", "1::1::4::11"], None, r"rated the same movie twice"),
        (["1::1::2::10"], None, r"no ratings left"),
        (["1::1::5::10"], ["1::Toy Story (1995)::A", "1::Dup (1995)::B"], r"duplicate movie id 1"),
        (["1::1::5::10"], ["1::::A"], r"movies.dat:1: empty title"),
        (["1::1::5::10"], ["one::Toy Story::A"], r"movies.dat:1: movie id 'one'"),
    ],
)
def test_ml1m_errors(tmp_path, ratings, movies, message):
    root = write_ml1m(tmp_path / "bad", ratings, movies)
    with pytest.raises(ValueError, match=message):
        load_movielens(root, "ml-1m")


def test_detect_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nope")
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        load_movielens(tmp_path, "ml-20m")


def test_ml100k_fixture_user_filter(tmp_path):
    root = tmp_path / "ml-100k"
    root.mkdir()
    items = "".join(f"{i}|Movie {i} (1990)|01-Jan-1990||http://x|0|1\n" for i in range(1, 31))
    (root / "u.item").write_bytes(items.encode("latin-1"))
    rows = [f"1\t{i}\t5\t{1000 + i}" for i in range(1, 22)]  # 21 kept ratings: kept (> 20)
    rows += [f"2\t{i}\t4\t{2000 + i}" for i in range(1, 21)]  # 20 kept: dropped
    rows += [f"1\t{i}\t3\t{3000 + i}" for i in range(22, 31)]  # low ratings: dropped
    (root / "u.data").write_text("\n".join(rows) + "\n")
    ds, movie_ids = load_movielens(root)
    assert ds.name == "ml-100k" and ds.num_users == 1 and ds.num_items == 30
    assert ds.user_items(0).tolist() == list(range(21))
    assert movie_ids.tolist() == list(range(1, 31))


def test_raw_ml100k_matches_release():
    ds, movie_ids = load_movielens(shared_path("data", "raw", "ml-100k"))
    rel = load_release(shared_path("data", "patchrec", "ml-100k"))
    assert np.array_equal(movie_ids - 1, np.arange(1682))
    assert (ds.num_users, ds.num_items, len(ds.items)) == (682, 1682, 51824)
    # Same users in the same rows (first-appearance order), same item sets, identical split ranges.
    for u in range(ds.num_users):
        assert sorted(ds.user_items(u).tolist()) == sorted(rel.user_items(u).tolist()), u
    for split in SPLITS:
        assert np.array_equal(ds.splits[split], rel.splits[split]), split
    sizes = {s: int(np.where(r[:, 0] >= 0, r[:, 1] - r[:, 0] + 1, 0).sum()) for s, r in ds.splits.items()}
    assert sizes == {"train": 49753, "val": 1035, "test": 1036}
    # Order: the release orders same-second ratings differently (not reproducible); everything else agrees.
    exact = float(np.mean(ds.items == rel.items))
    assert 0.5 < exact < 1.0
    assert sum(np.array_equal(ds.user_items(u), rel.user_items(u)) for u in range(ds.num_users)) == 4


def test_raw_ml100k_order_differs_only_inside_same_second_groups():
    raw = shared_path("data", "raw", "ml-100k")
    ds, _ = load_movielens(raw)
    rel = load_release(shared_path("data", "patchrec", "ml-100k"))
    rows = np.loadtxt(raw / "u.data", dtype=np.int64)
    rows = rows[rows[:, 2] >= 4]
    users, counts = np.unique(rows[:, 0], return_counts=True)
    rows = rows[np.isin(rows[:, 0], users[counts > 20])]
    first_user = {}
    for user in rows[:, 0].tolist():
        first_user.setdefault(user, len(first_user))
    stamp = {(first_user[u], i - 1): t for u, i, _, t in rows.tolist()}
    for u in range(ds.num_users):
        mine = [stamp[(u, i)] for i in ds.user_items(u).tolist()]
        theirs = [stamp[(u, i)] for i in rel.user_items(u).tolist()]
        assert mine == theirs == sorted(mine)  # same timestamp sequence: only same-second items permuted


def test_titles_match_release():
    raw100 = shared_path("data", "raw", "ml-100k")
    rel100 = load_release(shared_path("data", "patchrec", "ml-100k"))
    ds, _ = load_movielens(raw100)
    mism = [(a, b) for a, b in zip(ds.titles, rel100.titles, strict=True) if a != b]
    # Only accents lost in the raw file (e.g. "Miserables, Les" vs "Misérables, Les").
    assert len(mism) == 7 and ("Miserables, Les", "Misérables, Les") in mism

    ids, raw_titles = read_movies(shared_path("data", "raw", "ml-1m", "movies.dat"), "ml-1m")
    rel_ids, rel_titles = read_id2title(shared_path("data", "patchrec", "ml-1m"))
    assert np.array_equal(ids - 1, rel_ids)  # the catalog is the whole movie table
    mism = [(r, t) for r, t in zip(raw_titles, rel_titles, strict=True) if normalize_title(r) != t]
    assert len(mism) == 14  # all are "?" in movies.dat where the release has an accent
    assert all("?" in r for r, _ in mism)
