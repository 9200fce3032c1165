"""Release format: loading the real releases, round trips, and every validation error naming file:line.
Also checks ``make_samples`` against a slow per-user loop over the real ML-100K release."""

import filecmp
import json

import numpy as np
import pytest
from conftest import shared_path

from patchrec.data.dataset import SPLITS, make_samples
from patchrec.data.release import load_release, read_id2title, write_release

PROMPT = "You are a helpful assistant.\nA user has watched [HISTORY_SEQUENCE]. Recommend one."


def write_files(root, titles="0||Alpha\n1||Beta\n2||Gamma\n3||Delta\n", sequences=None, prompt=PROMPT):
    root.mkdir(parents=True, exist_ok=True)
    if sequences is None:
        sequences = [
            {"user": 0, "items": [0, 1, 2, 3, 1], "train": [0, 2], "val": [3, 3], "test": [4, 4]},
            {"user": 1, "items": [3, 2], "train": [0, 1], "val": None, "test": None},
        ]
    lines = [s if isinstance(s, str) else json.dumps(s) for s in sequences]
    (root / "id2title.txt").write_text(titles, encoding="utf-8")
    (root / "sequences.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (root / "prompt.txt").write_text(prompt, encoding="utf-8")
    return root


def test_small_release_loads(tmp_path):
    ds = load_release(write_files(tmp_path / "r"))
    assert ds.name == "r" and ds.num_users == 2 and ds.num_items == 4
    assert ds.titles == ["Alpha", "Beta", "Gamma", "Delta"]
    assert ds.user_items(0).tolist() == [0, 1, 2, 3, 1] and ds.user_items(1).tolist() == [3, 2]
    assert ds.splits["val"].tolist() == [[3, 3], [-1, -1]]
    assert ds.user_ids.tolist() == [0, 1]
    assert ds.system_prompt == "You are a helpful assistant."
    assert ds.user_prompt.endswith("Recommend one.")


def test_gapped_ids_map_to_ranks_and_write_back(tmp_path):
    src = write_files(
        tmp_path / "src",
        titles="0||A\n5||B\n7||C\n",
        sequences=[{"user": 3, "items": [7, 0, 5], "train": [0, 1], "val": None, "test": [2, 2]}],
    )
    ds = load_release(src)
    assert ds.user_items(0).tolist() == [2, 0, 1]
    ids, titles = read_id2title(src)
    assert ids.tolist() == [0, 5, 7] and titles == ["A", "B", "C"]
    write_release(ds, tmp_path / "out", item_ids=ids)
    for name in ("id2title.txt", "sequences.jsonl", "prompt.txt"):
        assert filecmp.cmp(src / name, tmp_path / "out" / name, shallow=False), name
    dense = write_release(ds, tmp_path / "dense")
    assert (dense / "id2title.txt").read_text().splitlines() == ["0||A", "1||B", "2||C"]


def test_write_refuses_existing_files_and_bad_ids(tmp_path):
    ds = load_release(write_files(tmp_path / "r"))
    with pytest.raises(ValueError, match="already exists"):
        write_release(ds, tmp_path / "r")
    write_release(ds, tmp_path / "r", overwrite=True)
    with pytest.raises(ValueError, match="strictly increasing"):
        write_release(ds, tmp_path / "x", item_ids=np.array([0, 2, 2, 3]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"titles": "0||A\n1||\n2||C\n3||D\n"}, r"id2title.txt:2: empty title"),
        ({"titles": "0||A\n0||B\n2||C\n3||D\n"}, r"id2title.txt:2: duplicate item id 0"),
        ({"titles": "0||A\n2||B\n1||C\n3||D\n"}, r"id2title.txt:3: item id 1 after 2"),
        ({"titles": "0||A\nx||B\n"}, r"id2title.txt:2: item id 'x' is not an integer"),
        ({"titles": "0||A\n1 B\n"}, r"id2title.txt:2: expected 'item_id\|\|title'"),
        ({"titles": "0||A\n-1||B\n"}, r"id2title.txt:2: negative item id"),
        ({"sequences": ['{"user": 1, "items": [0']}, r"sequences.jsonl:1: malformed JSON"),
        ({"sequences": ["[1, 2]"]}, r"sequences.jsonl:1: expected a JSON object"),
        ({"sequences": ['{"user": 0, "items": [0]}']}, r"sequences.jsonl:1: keys must be .*missing"),
        (
            {"sequences": ['{"user": 0, "items": [0], "train": null, "val": null, "test": null, "x": 1}']},
            r"sequences.jsonl:1: keys must be .*unexpected \['x'\]",
        ),
        (
            {"sequences": [{"user": 0, "items": [0, 9], "train": None, "val": None, "test": None}]},
            r"sequences.jsonl:1: unknown item id 9",
        ),
        (
            {
                "titles": "0||A\n2||B\n",
                "sequences": [{"user": 0, "items": [1], "train": None, "val": None, "test": None}],
            },
            r"sequences.jsonl:1: unknown item id 1",
        ),
        (
            {"sequences": [{"user": 0, "items": [0, True], "train": None, "val": None, "test": None}]},
            r"sequences.jsonl:1: 'items' must be a list of integer",
        ),
        (
            {"sequences": [{"user": 0, "items": [0, 1], "train": [0, 2], "val": None, "test": None}]},
            r"sequences.jsonl:1: 'train' range \[0, 2\] outside",
        ),
        (
            {"sequences": [{"user": 0, "items": [0, 1], "train": [1, 0], "val": None, "test": None}]},
            r"sequences.jsonl:1: 'train' range \[1, 0\] ends before",
        ),
        (
            {"sequences": [{"user": 0, "items": [0, 1, 2], "train": [0, 1], "val": [1, 2], "test": None}]},
            r"sequences.jsonl:1: 'val' range \[1, 2\] overlaps",
        ),
        (
            {"sequences": [{"user": 0, "items": [0, 1, 2], "train": [1, 2], "val": None, "test": [0, 0]}]},
            r"sequences.jsonl:1: 'test' range \[0, 0\] overlaps or precedes 'train'",
        ),
        (
            {"sequences": [{"user": 0, "items": [0], "train": [0], "val": None, "test": None}]},
            r"sequences.jsonl:1: 'train' must be null or \[start, end\]",
        ),
        (
            {
                "sequences": [
                    {"user": 0, "items": [0], "train": None, "val": None, "test": None},
                    {"user": 0, "items": [1], "train": None, "val": None, "test": None},
                ]
            },
            r"sequences.jsonl:2: duplicate user 0 \(first on line 1\)",
        ),
        (
            {"sequences": [{"user": 0, "items": [0], "train": None, "val": None, "test": None}, ""]},
            r"sequences.jsonl:2: malformed JSON",
        ),
        ({"prompt": "only one line"}, r"prompt.txt: expected exactly 2 lines"),
        ({"prompt": "a\nb\nc"}, r"prompt.txt: expected exactly 2 lines"),
        ({"prompt": "sys\nno placeholder"}, r"prompt.txt:2: user prompt must contain"),
        ({"prompt": " \nuser [HISTORY_SEQUENCE]"}, r"prompt.txt:1: empty system prompt"),
    ],
)
def test_validation_errors_name_file_and_line(tmp_path, kwargs, message):
    root = write_files(tmp_path / "bad", **kwargs)
    with pytest.raises(ValueError, match=message):
        load_release(root)


@pytest.mark.parametrize("missing", ["id2title.txt", "sequences.jsonl", "prompt.txt"])
def test_missing_file(tmp_path, missing):
    root = write_files(tmp_path / "r")
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_release(root)
    with pytest.raises(FileNotFoundError):
        load_release(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, users, items, interactions",
    [("ml-100k", 682, 1682, 51824), ("ml-1m", 6038, 3883, 575281), ("goodreads", 2090, 8793, 162539)],
)
def test_real_release_round_trips_byte_for_byte(tmp_path, name, users, items, interactions):
    src = shared_path("data", "patchrec", name)
    ds = load_release(src)
    assert (ds.num_users, ds.num_items, len(ds.items)) == (users, items, interactions)
    assert ds.user_ids.tolist() == list(range(users))
    ids, _ = read_id2title(src)
    out = write_release(ds, tmp_path / name, item_ids=ids)
    for file in ("id2title.txt", "sequences.jsonl", "prompt.txt"):
        assert filecmp.cmp(src / file, out / file, shallow=False), file
    again = load_release(out)
    assert np.array_equal(again.items, ds.items) and again.titles == ds.titles
    for split in SPLITS:
        assert np.array_equal(again.splits[split], ds.splits[split])


def test_ml1m_release_ids_have_gaps_mapped_to_ranks():
    src = shared_path("data", "patchrec", "ml-1m")
    ids, titles = read_id2title(src)
    assert len(ids) == 3883 and ids[-1] == 3951  # 69 MovieLens ids absent from the catalog
    ds = load_release(src)
    first = json.loads((src / "sequences.jsonl").read_text().split("\n", 1)[0])
    assert [titles[np.searchsorted(ids, i)] for i in first["items"]] == [
        ds.titles[i] for i in ds.user_items(0)
    ]


# Per-split sample counts (L = 100) of the releases, computed by the slow loop below; kept here so that
# a change in make_samples or in the loader shows up as a number.
EXPECTED_SAMPLES = {
    "ml-100k": {"train": 47749, "val": 1005, "test": 1024},
    "ml-1m": {"train": 534185, "val": 11492, "test": 11494},
    "goodreads": {"train": 149773, "val": 3248, "test": 3248},
}


def slow_samples(ds, split, max_items):
    out = []
    for u in range(ds.num_users):
        start, end = ds.splits[split][u]
        if start < 0:
            continue
        items = ds.user_items(u).tolist()
        for idx in range(start, end + 1):
            if idx >= 3:
                out.append((u, items[max(0, idx - max_items) : idx], items[idx]))
    return out


@pytest.mark.parametrize("max_items", [100, 20])
def test_make_samples_matches_slow_loop_on_ml100k(max_items):
    ds = load_release(shared_path("data", "patchrec", "ml-100k"))
    for split in SPLITS:
        samples = make_samples(ds, split, max_items)
        expected = slow_samples(ds, split, max_items)
        assert len(samples) == len(expected) > 0
        if max_items == 100:
            assert len(samples) == EXPECTED_SAMPLES["ml-100k"][split]
        for i, (u, history, target) in enumerate(expected):
            assert samples.user[i] == u
            assert samples.history(i).tolist() == history
            assert samples.target(i) == target


@pytest.mark.parametrize("name", ["ml-1m", "goodreads"])
def test_sample_counts_of_the_releases(name):
    ds = load_release(shared_path("data", "patchrec", name))
    counts = {split: len(make_samples(ds, split, 100)) for split in SPLITS}
    # every position >= 3 of a split range is a sample
    for split in SPLITS:
        r = ds.splits[split]
        has = r[:, 0] >= 0
        assert counts[split] == int(np.maximum(r[has, 1] - np.maximum(r[has, 0], 3) + 1, 0).sum())
    assert counts == EXPECTED_SAMPLES[name]
