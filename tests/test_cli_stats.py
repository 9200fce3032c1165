"""``patchrec stats``: figures recomputed by brute force on a tiny release, and the real ML-100K release."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import LLAMA3_TOKENIZER, shared_path
from tiny_data import build_tiny_tokenizer, tiny_dataset

from patchrec.batching.tokens import load_tokenizer
from patchrec.cli import main
from patchrec.data.dataset import make_samples
from patchrec.data.release import write_release


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def run_json(capsys, *argv: str) -> dict:
    assert main(["stats", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_stats_tiny_release_brute_force(tmp_path, capsys, tiny_tokenizer_dir):
    ds = tiny_dataset(seed=5, num_users=10, max_len=30)
    write_release(ds, tmp_path / "tiny")
    L, G, K = 12, 3, 5
    got = run_json(capsys, "--data", str(tmp_path / "tiny"), "--tokenizer", str(tiny_tokenizer_dir),
                   "--max-items", str(L), "--group-size", str(G))

    tok = load_tokenizer(tiny_tokenizer_dir)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in ds.titles]
    per_user = np.diff(ds.user_offsets)
    assert got["users"] == 10 and got["items"] == len(ds.titles) and got["interactions"] == len(ds.items)
    assert got["max_interactions"] == per_user.max()
    assert got["avg_interactions"] == pytest.approx(per_user.mean())
    assert got["avg_title_tokens"] == pytest.approx(np.mean(lengths))
    assert got["samples"] == {s: len(make_samples(ds, s, max_items=L)) for s in ("train", "val", "test")}

    test = make_samples(ds, "test", max_items=L)
    ratios_i, ratios_s = [], []
    for i in range(len(test)):
        hist = [lengths[t] for t in test.history(i)]
        n = len(hist)
        before = sum(hist)
        after_i = sum(hist[max(n - K, 0):]) + max(n - K, 0)
        older = max(n - 2 * G, 0)
        sessions = max(older // G, 1) if older else 0
        after_s = sum(hist[max(n - G, 0):]) + min(max(n - G, 0), G) + sessions
        ratios_i.append(before / after_i)
        ratios_s.append(before / after_s)
    comp = got["compression"]
    assert comp["pft-i"]["k"] == K and comp["pft-s"]["g"] == G
    assert comp["pft-i"]["measured"] == pytest.approx(np.mean(ratios_i))
    assert comp["pft-s"]["measured"] == pytest.approx(np.mean(ratios_s))
    a = np.mean(lengths)
    assert comp["pft-i"]["nominal"] == pytest.approx(L * a / (K * a + (L - K)))
    assert comp["pft-s"]["nominal"] == pytest.approx(L * a / (G * a + G + (L - 2 * G) // G))

    assert main(["stats", "--data", str(tmp_path / "tiny"), "--tokenizer", str(tiny_tokenizer_dir)]) == 0
    table = capsys.readouterr().out
    assert "pft-s (G=5)" in table and "pft-i (K=5)" in table and "items (catalog)" in table


def test_stats_bad_arguments(tmp_path, capsys, tiny_tokenizer_dir):
    write_release(tiny_dataset(), tmp_path / "tiny")
    args = ["stats", "--data", str(tmp_path / "tiny"), "--tokenizer", str(tiny_tokenizer_dir)]
    assert main([*args, "--max-items", "0"]) == 2
    assert "max_items" in capsys.readouterr().err
    assert main([*args, "--group-size", "0"]) == 2
    assert main(["stats", "--data", str(tmp_path / "missing"), "--tokenizer", str(tiny_tokenizer_dir)]) == 2


def test_stats_ml100k_llama3(capsys):
    data = shared_path("data", "patchrec", "ml-100k")
    shared_path("tokenizers", "llama3")
    got = run_json(capsys, "--data", str(data), "--tokenizer", str(LLAMA3_TOKENIZER), "--group-size", "20")
    assert (got["users"], got["items"], got["interactions"]) == (682, 1682, 51824)
    assert got["samples"] == {"train": 47749, "val": 1005, "test": 1024}
    assert 3.5 < got["avg_title_tokens"] < 4.5
    comp = got["compression"]
    assert comp["pft-s"]["g"] == 20
    # Test histories are mostly full (L = 100), so measured sits a little under nominal.
    for plan in ("pft-i", "pft-s"):
        assert 1 < comp[plan]["measured"] <= comp[plan]["nominal"] * 1.05
