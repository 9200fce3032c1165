"""``patchrec reproduce`` on a tiny backbone and synthetic data: every row, the same samples per step and
steps per stage for every LLM, the summary files, and resume that skips what is done."""

from __future__ import annotations

import json

import pytest

import patchrec.reproduce as reproduce_module
from patchrec.reproduce import Reproduction, Scale

SMOKE = Scale(max_items=8, batch_size=4, train_samples=12, test_samples=6, lr=1e-3, k=3, g=2, exact=True,
              max_rows=2048, baseline_minutes=0.0, why="test", baseline_epochs=2)  # fmt: skip


pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A random tiny Llama with a title BPE, saved as a Hugging Face directory (a stand-in backbone)."""
    from patchrec.batching.tokenizer_train import train_title_tokenizer
    from patchrec.batching.tokens import load_tokenizer
    from patchrec.data.source import load_data
    from patchrec.model.decoder import PackedLlama

    path = tmp_path_factory.mktemp("backbone")
    dataset = load_data("synthetic")
    train_title_tokenizer(dataset.titles, path, 400, extra_texts=[dataset.system_prompt, dataset.user_prompt])
    PackedLlama.from_preset("tiny", len(load_tokenizer(path)), seed=0).save_pretrained(path)
    return path


def test_reproduce_rows_summary_and_resume(backbone, tmp_path, monkeypatch):
    out = tmp_path / "repro"
    rows = Reproduction("synthetic", str(backbone), out, SMOKE, progress=False).run()
    names = [r.name for r in rows]
    assert names == ["popularity", "sasrec", "gru4rec", "zero-shot", "vanilla", "pft-i", "pft-s"]
    by_name = {r.name: r for r in rows}
    # Every LLM stage: the same number of steps of the same number of samples.
    stages = {s: json.loads((out / "stages" / s / "stage.json").read_text())
              for s in ("vanilla", "pretrain", "pft-i", "pft-s")}  # fmt: skip
    assert {(s["steps"], s["samples_trained"]) for s in stages.values()} == {(3, 12)}
    for stage in stages:
        log = [json.loads(x) for x in (out / "stages" / stage / "log.jsonl").read_text().splitlines()]
        assert [x["samples"] for x in log if "loss" in x] == [4, 4, 4]
    assert json.loads((out / "stages" / "pft-s" / "train_config.json").read_text())["init"] == str(
        out / "stages" / "pretrain")
    # Compression: vanilla reads everything as text, PFT-S compresses more than PFT-I.
    assert by_name["vanilla"].cr_measured == pytest.approx(1.0)
    assert 1.0 < by_name["pft-i"].cr_measured < by_name["pft-s"].cr_measured
    for name in ("zero-shot", "vanilla", "pft-i", "pft-s"):
        row = by_name[name]
        assert row.ranking == "beam" and row.exact_metrics is not None and row.eval_s_per_sample > 0
        beam = json.loads((out / "eval" / f"{name}-beam.json").read_text())
        assert beam["config"]["protocol"] == "authors" and beam["num_samples"] == 6
    assert by_name["pft-i"].train_seconds > 0 and by_name["zero-shot"].train_seconds is None

    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_samples"] == 6 and summary["settings"]["protocol"] == "authors"
    table = (out / "summary.md").read_text()
    assert table.count("\n| ") >= 8 and "Exact whole-catalog ranking" in table
    assert (out / "summary.png").stat().st_size > 0
    assert (out / "stages" / ".gitignore").read_text().startswith("*/model/")

    # A finished run resumes without training or ranking anything again.
    def refuse(*args, **kwargs):
        raise AssertionError("resume retrained or re-evaluated")

    monkeypatch.setattr("patchrec.train.loop.train", refuse)
    monkeypatch.setattr("patchrec.eval.evaluate.evaluate", refuse)
    again = Reproduction("synthetic", str(backbone), out, SMOKE, resume=True, progress=False).run()
    assert [r.metrics for r in again] == [r.metrics for r in rows]

    with pytest.raises(ValueError, match="--resume"):
        Reproduction("synthetic", str(backbone), out, SMOKE, progress=False)
    with pytest.raises(ValueError, match="differ"):
        Reproduction("synthetic", str(backbone), out, SMOKE, resume=True, protocol="clean", progress=False)
    with pytest.raises(ValueError, match="scale"):
        Reproduction("synthetic", str(backbone), tmp_path / "other", "huge")


def test_scales_are_documented_and_cpu_fits_the_release_shapes():
    cpu = reproduce_module.SCALES["cpu"]
    assert cpu.batch_size * 30 == cpu.train_samples and cpu.g < cpu.max_items
    paper = reproduce_module.SCALES["paper"]
    assert paper.max_items == 100 and paper.train_samples == 0 and paper.exact
    assert reproduce_module.released("ml-100k", "pft-s")["lr"] == 3e-6
    assert reproduce_module.released("goodreads", "pft-i")["batch_size"] == 32
