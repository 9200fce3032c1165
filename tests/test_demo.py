"""``patchrec demo --quick``: the whole pipeline end to end on a tiny synthetic problem."""

from __future__ import annotations

import json

import pytest

from patchrec.cli import main

# The demo trains and ranks with the pure-PyTorch references, not the Triton interpreter.
pytestmark = pytest.mark.usefixtures("reference_ops")


def test_quick_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name in ("popularity", "vanilla SFT", "pretrain -> PFT-I"):
        assert name in printed
    assert "wall time" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["ranking"] == "exact" and results["mask_history"] is False
    rows = {r["name"].split(" (")[0]: r for r in results["rows"]}
    assert set(rows) == {"popularity", "vanilla SFT", "pretrain -> PFT-I"}
    for row in rows.values():
        for key in ("HR@10", "HR@20", "NDCG@10", "NDCG@20"):
            assert 0.0 <= row["metrics"][key] <= 1.0
        assert row["metrics"]["HR@20"] >= row["metrics"]["HR@10"]
    # Vanilla reads every history item as text; PFT-I compresses all but the newest k items.
    assert rows["vanilla SFT"]["compression"] == pytest.approx(1.0)
    assert rows["pretrain -> PFT-I"]["compression"] > 1.5
    assert rows["pretrain -> PFT-I"]["rows_per_s"] > 0
    # Both stages left a loadable model with its tokenizer; stage 2 started from stage 1's run.
    for stage in ("vanilla", "pretrain", "pft-i"):
        assert (out / stage / "model" / "config.json").is_file()
        assert (out / stage / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "pft-i" / "train_config.json").read_text())["init"] == str(out / "pretrain")
