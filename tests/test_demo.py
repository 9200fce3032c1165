"""``patchrec demo --quick``: the whole pipeline end to end on a tiny synthetic problem."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from patchrec.baselines.popularity import Popularity
from patchrec.cli import main
from patchrec.data.dataset import make_samples
from patchrec.data.release import load_release
from patchrec.eval.metrics import rank_samples, ranking_metrics
from patchrec.experiments.demo import DemoConfig, run_demo, synthetic_dataset

# The demo trains and ranks with the pure-PyTorch references, not the Triton interpreter.
pytestmark = pytest.mark.usefixtures("reference_ops")


def test_quick_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name in ("popularity", "topic oracle", "vanilla SFT", "pretrain -> PFT-I", "vanilla SFT, last"):
        assert name in printed
    assert "wall time" in printed and "optimizer steps" in printed
    assert f"patchrec serve --model {out / 'pft-i'}" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["ranking"] == "exact" and results["mask_history"] is False
    rows = {r["name"].split(" (")[0].split(",")[0] + (" short" if "last" in r["name"] else ""): r
            for r in results["rows"]}
    assert set(rows) == {"popularity", "topic oracle", "topic oracle short", "vanilla SFT",
                         "pretrain -> PFT-I", "vanilla SFT short"}
    for row in rows.values():
        for key in ("HR@10", "HR@20", "NDCG@10", "NDCG@20"):
            assert 0.0 <= row["metrics"][key] <= 1.0
        assert row["metrics"]["HR@20"] >= row["metrics"]["HR@10"]
    # Vanilla reads every history item as text; PFT-I compresses all but the newest k items.
    assert rows["vanilla SFT"]["compression"] == pytest.approx(1.0)
    assert rows["pretrain -> PFT-I"]["compression"] > 1.5
    assert rows["pretrain -> PFT-I"]["rows_per_s"] > 0
    # Equal compute: the short vanilla reads fewer history rows than the full one.
    assert rows["vanilla SFT short"]["history_rows"] < rows["vanilla SFT"]["history_rows"]
    # Every LLM took the same optimizer steps.
    def config(stage):
        return json.loads((out / stage / "train_config.json").read_text())

    for stage in ("vanilla", "vanilla-short"):
        assert config(stage)["max_steps"] == results["optimizer_steps"]
    assert config("pretrain")["max_steps"] + config("pft-i")["max_steps"] == results["optimizer_steps"]
    # Every stage left a loadable model with its tokenizer; all start from the catalog-text backbone and
    # PFT-I started from patch pre-training's run.
    assert config("vanilla")["init"] == config("pretrain")["init"] == str(out / "catalog" / "model")
    for stage in ("catalog", "vanilla", "pretrain", "pft-i", "vanilla-short"):
        assert (out / stage / "model" / "config.json").is_file()
        assert (out / stage / "model" / "tokenizer.json").is_file()
    assert config("pft-i")["init"] == str(out / "pretrain")
    # Every stage trains on the dataset the demo ranks: the release directory it wrote from the generator
    # with the demo's options (drift_length is not a TrainConfig field, so "synthetic" could not carry it).
    for stage in ("vanilla", "pretrain", "pft-i", "vanilla-short"):
        assert config(stage)["data"] == str(out / "data")
    assert results["config"]["drift_length"] == DemoConfig.quick().drift_length
    data, expected = load_release(out / "data"), synthetic_dataset(DemoConfig.quick())
    assert data.titles == expected.titles
    assert np.array_equal(data.items, expected.items)
    assert np.array_equal(data.user_offsets, expected.user_offsets)
    for split in ("train", "val", "test"):
        assert np.array_equal(data.splits[split], expected.splits[split])
    other = synthetic_dataset(dataclasses.replace(DemoConfig.quick(), drift_length=50.0))
    assert not np.array_equal(other.items, expected.items)  # the option reaches the generator
    # Every row's metrics are recomputable from its per-sample ranks, over the recorded test samples.
    ranked = results["ranked_samples"]
    assert ranked["split"] == "test" and ranked["max_items"] == DemoConfig.quick().max_items
    test = make_samples(data, "test", ranked["max_items"])
    assert len(ranked["index"]) == results["test_samples"] and max(ranked["index"]) < len(test)
    for row in results["rows"]:
        assert len(row["ranks"]) == results["test_samples"]
        assert ranking_metrics(np.asarray(row["ranks"]), results["ks"]) == pytest.approx(row["metrics"])
    # ... and the popularity row's ranks are those of popularity on exactly those samples.
    samples = test.select(np.asarray(ranked["index"]))
    ranks = rank_samples(Popularity.fit(data).scorer(samples), samples)
    assert ranks.tolist() == rows["popularity"]["ranks"]


def test_demo_default_split(tmp_path):
    """The default's fair split: every recommender the same steps; PFT-I spends most of them on PFT-I."""
    demo = DemoConfig()
    half = round(demo.steps * demo.pretrain_share)
    assert 0 < half < demo.steps - half
    assert demo.short_items > demo.k  # the equal-compute row reads more raw items than PFT-I keeps as text
    with pytest.raises(ValueError, match="leaves a stage empty"):
        run_demo(dataclasses.replace(DemoConfig.quick(), steps=2, pretrain_share=0.2), tmp_path)
    backbone = DemoConfig.for_backbone("model")
    assert backbone.catalog_steps == 0 and backbone.backbone == "model"


def test_catalog_texts_group_one_topic():
    import numpy as np

    from patchrec.train.catalog_pretrain import catalog_texts

    titles = [f"t{i}" for i in range(12)]
    topic = np.arange(12) % 3
    texts = catalog_texts(titles, topic, 20, 3, np.random.default_rng(0))
    assert len(texts) == 20
    for text in texts:
        parts = text.split(" ; ")
        assert len(parts) == len(set(parts)) == 3
        assert len({int(p[1:]) % 3 for p in parts}) == 1
