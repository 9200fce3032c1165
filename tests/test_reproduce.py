"""``patchrec reproduce`` on a tiny backbone and synthetic data: every experiment's stages and rows, the same
samples per step and steps per stage for every LLM, checkpoints, the summary files, resume that skips what is
done (and adds experiments), the dry run, the released-settings preset and the evaluation dtype."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path

import patchrec.experiments.reproduce as reproduce_module
from patchrec.experiments.reproduce import Reproduction, Scale, resolve_eval_dtype
from patchrec.experiments.reproduce_estimate import ModelSize, checkpoint_plan, save_every
from patchrec.experiments.reproduce_settings import (
    EXPERIMENTS,
    RELEASES,
    experiment_stages,
    infer_preset,
    parse_experiments,
    released,
    resolve_preset,
)

SMOKE = Scale(max_items=8, batch_size=4, train_samples=12, test_samples=6, lr=1e-3, k=3, g=2, exact=True,
              max_rows=2048, baseline_minutes=0.0, why="test", baseline_epochs=2, long_lengths=(12, 0),
              long_k=3)  # fmt: skip
TABLE2_STAGES = ["vanilla", "pretrain", "pft-i", "pft-s"]
LATER_STAGES = ["pft-i-no-pt", "pft-s-no-pt", "dropout", "dropout-pft-i", "long-pft-i-L12", "long-pft-s-L12",
                "long-pft-i-Lall", "long-pft-s-Lall"]  # fmt: skip


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A random tiny Llama with a title BPE, saved as a Hugging Face directory (a stand-in backbone)."""
    from patchrec.batching.tokenizer_train import train_title_tokenizer
    from patchrec.batching.tokens import load_tokenizer
    from patchrec.data.source import load_data
    from patchrec.model.decoder import PackedDecoder

    path = tmp_path_factory.mktemp("backbone")
    dataset = load_data("synthetic")
    train_title_tokenizer(dataset.titles, path, 400, extra_texts=[dataset.system_prompt, dataset.user_prompt])
    PackedDecoder.from_preset("tiny", len(load_tokenizer(path)), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quiet_cpu():
    """The ops' references and one thread for the module's runs (``reference_ops_one_thread``, per module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield mp
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(backbone, tmp_path_factory, quiet_cpu):
    """Experiment table2, then every other experiment added to the same run with resume (stages trained by
    the second call recorded)."""
    import patchrec.train.loop

    out = tmp_path_factory.mktemp("repro") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        table2 = Reproduction("synthetic", str(backbone), out, SMOKE, preset="ml-100k", progress=False).run()
    trained, real = [], patchrec.train.loop.train

    def spy(config, **kwargs):
        trained.append(Path(config.out).name)
        return real(config, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("patchrec.experiments.reproduce.train", spy)
        everything = Reproduction("synthetic", str(backbone), out, SMOKE, preset="ml-100k", progress=False,
                                  experiments=EXPERIMENTS, resume=True).run()  # fmt: skip
    return out, table2, everything, trained, printed.getvalue()


def _config(out: Path, stage: str) -> dict:
    return json.loads((out / "stages" / stage / "train_config.json").read_text())


def test_table2_rows_stages_checkpoints_and_summary(run):
    out, rows, _, _, printed = run
    names = ["popularity", "sasrec", "gru4rec", "zero-shot", "vanilla", "pft-i", "pft-s"]
    assert [r.name for r in rows] == names
    by_name = {r.name: r for r in rows}
    # Every LLM stage: the same number of steps of the same number of samples.
    stages = {s: json.loads((out / "stages" / s / "stage.json").read_text()) for s in TABLE2_STAGES}
    assert {(s["steps"], s["samples_trained"]) for s in stages.values()} == {(3, 12)}
    for stage in stages:
        log = [json.loads(x) for x in (out / "stages" / stage / "log.jsonl").read_text().splitlines()]
        assert [x["samples"] for x in log if "loss" in x] == [4, 4, 4]
        # 10 checkpoints per stage of 3 steps: one every step, the newest 2 kept while training, all deleted
        # once the stage's model is written.
        config = _config(out, stage)
        assert (config["save_every"], config["keep_checkpoints"], config["p"]) == (1, 2, None)
        assert not (out / "stages" / stage / "checkpoints").exists()
        assert (out / "stages" / stage / "model" / "config.json").is_file()
    assert _config(out, "pft-s")["init"] == str(out / "stages" / "pretrain")
    # The checkpoint plan is printed before anything trains.
    assert printed.startswith("checkpoints: ") and "every 1 steps = 3 per stage" in printed
    assert "4 stage(s) to train" in printed
    # Compression: vanilla reads everything as text, PFT-S compresses more than PFT-I.
    assert by_name["vanilla"].cr_measured == pytest.approx(1.0)
    assert 1.0 < by_name["pft-i"].cr_measured < by_name["pft-s"].cr_measured
    tokens = [by_name[name].history_tokens for name in ("pft-s", "pft-i", "vanilla")]
    assert tokens == sorted(set(tokens))
    for name in ("zero-shot", "vanilla", "pft-i", "pft-s"):
        row = by_name[name]
        assert row.ranking == "beam" and row.exact_metrics is not None and row.eval_s_per_sample > 0
        assert row.eval_dtype == "float32"  # CPU default
        beam = json.loads((out / "eval" / f"{name}-beam.json").read_text())
        assert beam["config"]["protocol"] == "authors" and beam["num_samples"] == 6
        assert (beam["config"]["dtype"], beam["config"]["device"]) == ("float32", "cpu")
    assert by_name["pft-i"].train_seconds > 0 and by_name["zero-shot"].train_seconds is None
    assert (out / "stages" / ".gitignore").read_text().startswith("*/model/")


def test_every_experiment_adds_its_stages_and_rows_on_resume(run, backbone):
    out, _, rows, trained, _ = run
    # Only the new experiments' stages trained; table4 ranks the shared pre-training stage.
    assert trained == LATER_STAGES
    assert [s.name for s in experiment_stages(EXPERIMENTS, SMOKE, 2)] == TABLE2_STAGES + LATER_STAGES
    by_name = {r.name: r for r in rows}
    assert [r.experiment for r in rows if r.ranking == "beam"] == (
        ["table2"] * 4 + ["table3"] * 2 + ["table4"] * 2 + ["dropout"] * 2 + ["long"] * 4)
    # Table 3: fine-tuned straight from the backbone.
    for stage in ("pft-i-no-pt", "pft-s-no-pt"):
        assert _config(out, stage)["init"] == str(backbone)
    # Table 4: the pre-training stage's model under PFT-I and PFT-S compression.
    for name, plan in (("pretrain-only-pft-i", "pft-i"), ("pretrain-only-pft-s", "pft-s")):
        config = json.loads((out / "eval" / f"{name}-beam.json").read_text())["config"]
        assert (config["stage"], config["plan"], config["experiment"]) == ("pretrain", plan, "table4")
    assert by_name["pretrain-only-pft-s"].cr_measured == pytest.approx(by_name["pft-s"].cr_measured)
    # Dropout ablation: a dropout first stage, then PFT-I from it.
    assert _config(out, "dropout")["stage"] == "dropout"
    assert _config(out, "dropout-pft-i")["init"] == str(out / "stages" / "dropout")
    # Long histories: K = G = 3 at L = 12 and at the longest history.
    job = Reproduction("synthetic", str(backbone), out, SMOKE, preset="ml-100k", resume=True)
    longest = int(np.diff(job.dataset.user_offsets).max())
    for L, name in ((12, "L12"), (longest, "Lall")):
        for plan in ("pft-i", "pft-s"):
            config = _config(out, f"long-{plan}-{name}")
            assert (config["max_items"], config["k"], config["g"], config["stage"]) == (L, 3, 3, plan)
            assert config["init"] == str(out / "stages" / "pretrain")
        assert by_name[f"long-pft-s-{name}"].cr_measured > by_name[f"long-pft-i-{name}"].cr_measured
        assert by_name[f"long-pft-i-{name}"].max_items == L
    assert by_name["long-pft-i-Lall"].history_tokens > by_name["long-pft-i-L12"].history_tokens
    # Fig. 8's cost curve: per L (8, 12, all) and plan; more history costs more, compression less.
    summary = json.loads((out / "summary.json").read_text())
    curve = {(c["length"], c["plan"]): c for c in summary["cost_curve"]}
    assert set(curve) == {(L, p) for L in ("8", "12", "all") for p in ("vanilla", "pft-i", "pft-s")}
    for L in ("8", "12", "all"):
        assert curve[L, "pft-s"]["history_tokens"] < curve[L, "pft-i"]["history_tokens"] < (
            curve[L, "vanilla"]["history_tokens"])
    assert curve["8", "vanilla"]["history_tokens"] < curve["12", "vanilla"]["history_tokens"] < (
        curve["all", "vanilla"]["history_tokens"])
    assert summary["experiments"] == list(EXPERIMENTS) and len(summary["rows"]) == 3 + 14
    table = (out / "summary.md").read_text()
    assert table.count("\n| ") >= 17 and "Exact whole-catalog ranking" in table and "Cost curve" in table
    assert (out / "summary.png").stat().st_size > 0
    saved = json.loads((out / "reproduce_config.json").read_text())
    assert saved["experiments"] == list(EXPERIMENTS) and saved["preset"] == "ml-100k"


def test_resume_skips_finished_work_and_checks_settings(run, backbone, tmp_path, monkeypatch):
    out, _, rows, _, _ = run

    def refuse(*args, **kwargs):
        raise AssertionError("resume retrained or re-evaluated")

    monkeypatch.setattr("patchrec.experiments.reproduce.train", refuse)
    monkeypatch.setattr("patchrec.experiments.reproduce.evaluate", refuse)
    again = Reproduction("synthetic", str(backbone), out, SMOKE, preset="ml-100k", experiments=EXPERIMENTS,
                         resume=True, progress=False).run()  # fmt: skip
    assert [r.metrics for r in again] == [r.metrics for r in rows]

    def make(**kwargs):
        return Reproduction("synthetic", str(backbone), out, SMOKE, **{"preset": "ml-100k", **kwargs})

    with pytest.raises(ValueError, match="--resume"):
        make()
    changes = ({"protocol": "clean"}, {"eval_dtype": "bf16"}, {"preset": "ml-1m"}, {"authors_code": True})
    for change in changes:
        with pytest.raises(ValueError, match="differ"):
            make(resume=True, **change)
    with pytest.raises(ValueError, match="scale"):
        Reproduction("synthetic", str(backbone), tmp_path / "other", "huge", preset="ml-100k")


def test_dry_run_counts_every_stage_and_row_without_training(backbone, tmp_path, monkeypatch):
    from patchrec.model.decoder import PackedDecoder

    monkeypatch.setattr("patchrec.experiments.reproduce.train", None)  # a dry run never trains
    plain = Reproduction("synthetic", str(backbone), tmp_path / "a", SMOKE, preset="ml-100k",
                         experiments=EXPERIMENTS).dry_run()  # fmt: skip
    stages = {s["stage"]: s for s in plain["stages"]}
    assert list(stages) == TABLE2_STAGES + LATER_STAGES
    assert {(s["samples"], s["steps"], s["batch_size"]) for s in stages.values()} == {(12, 3, 4)}
    assert {s["stage"] for s in stages.values() if s["views"] == 2} == {"pretrain", "dropout"}
    assert all(s["rows_per_sample"] > 0 and s["tflop"] > 0 and s["save_every"] == 1 for s in stages.values())
    assert len(plain["rows"]) == 14 and all(r["samples"] == 6 and r["exact_tflop"] > 0 for r in plain["rows"])
    # Sizes from the config alone match the real model.
    params = sum(p.numel() for p in PackedDecoder.from_pretrained(backbone).parameters())
    assert plain["model"]["params"] == params
    assert plain["model"]["checkpoint_gb"] == pytest.approx(12 * params / 1e9)
    assert plain["totals"]["train_gpu_hours"] > 0 and plain["cost_curve"]
    assert set(plain["totals"]["by_experiment"]) == set(EXPERIMENTS)
    assert {s["experiment"] for s in plain["stages"] if s["stage"] == "pretrain"} == {"table2"}
    assert (tmp_path / "a" / "dry_run.md").read_text().startswith("Dry run")
    assert not (tmp_path / "a" / "reproduce_config.json").exists()
    # The authors' pre-training (p = 0) reads both views as text: exactly twice vanilla's positions; the
    # paper's curriculum compresses some items of the second view.
    authors = Reproduction("synthetic", str(backbone), tmp_path / "b", SMOKE, preset="ml-100k",
                           authors_code=True).dry_run()  # fmt: skip
    by_stage = {s["stage"]: s for s in authors["stages"]}
    assert by_stage["pretrain"]["rows_per_sample"] == 2 * by_stage["vanilla"]["rows_per_sample"]
    assert stages["pretrain"]["rows_per_sample"] < 2 * stages["vanilla"]["rows_per_sample"]
    assert by_stage["pretrain"]["p"].startswith("0") and stages["pretrain"]["p"] == "t/T"


def test_cli_dry_run_needs_a_known_dataset_or_preset(backbone, tmp_path, capsys):
    from patchrec.cli import main

    args = ["reproduce", "--data", "synthetic", "--backbone", str(backbone), "--out", str(tmp_path / "r"),
            "--dry-run", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and all(name in err for name in RELEASES)
    assert main([*args, "--preset", "ml-1m", "--experiments", "table2,table4"]) == 0
    out = capsys.readouterr().out
    assert "Estimated GPU hours" in out and "pretrain-only" not in out and "pre-training only" in out
    dry = json.loads((tmp_path / "r" / "dry_run.json").read_text())
    assert dry["settings"]["seed"] == 0 and dry["experiments"] == ["table2", "table4"]
    # --scale paper: the authors' seed value; --no-exact keeps the scale's name and drops exact ranking.
    paper = ["--preset", "ml-1m", "--scale", "paper", "--no-exact", "--assume-train-tflops", "100"]
    assert main([*args, *paper]) == 0
    settings = json.loads((tmp_path / "r" / "dry_run.json").read_text())["settings"]
    assert (settings["scale"], settings["exact"], settings["seed"]) == ("paper", False, 42)
    dry = json.loads((tmp_path / "r" / "dry_run.json").read_text())
    assert dry["throughput_assumed"]["train_tflops"] == 100 and "exact_tflop" not in dry["rows"][0]
    assert main([*args[:-2], "--preset", "ml-1m", "--assume-train-tflops", "100"]) == 2
    assert main([*args, "--preset", "ml-1m", "--experiments", "table9"]) == 2


def test_preset_comes_from_the_flag_or_the_data_never_the_folder_name(tmp_path, monkeypatch):
    from tiny_data import tiny_dataset

    from patchrec.data.release import load_release, write_release

    path = write_release(tiny_dataset(), tmp_path / "ml-1m")  # named like a release, but it is not one
    data = load_release(path)
    with pytest.raises(ValueError, match="--preset one of") as info:
        resolve_preset(data, None, str(path))
    assert all(name in str(info.value) for name in RELEASES)
    assert resolve_preset(data, "goodreads", str(path)) == ("goodreads", "--preset")
    with pytest.raises(ValueError, match="--preset must be one of"):
        resolve_preset(data, "tiny", str(path))
    monkeypatch.setitem(RELEASES, "tiny-release", (data.num_users, data.num_items, len(data.items)))
    assert infer_preset(data) == "tiny-release"


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_the_released_datasets_are_recognised(name):
    from patchrec.data.release import load_release

    assert infer_preset(load_release(shared_path("data", "patchrec", name))) == name


def test_eval_dtype_defaults_and_bf16_ranking(backbone, tmp_path, quiet_cpu):
    assert resolve_eval_dtype("auto", "cpu") == "float32" and resolve_eval_dtype("auto", "cuda") == "bfloat16"
    assert resolve_eval_dtype("fp32", "cuda") == "float32" and resolve_eval_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="--eval-dtype"):
        resolve_eval_dtype("fp16", "cpu")
    job = Reproduction("synthetic", str(backbone), tmp_path, SMOKE, preset="ml-100k", eval_dtype="bf16",
                       progress=False)  # fmt: skip
    res = job.evaluate_row(job.rows[0], job.tokens())  # the zero-shot backbone, beam and exact
    for ranking in ("beam", "exact"):
        assert res[ranking]["config"]["dtype"] == "bfloat16" and res[ranking]["num_samples"] == 6
        assert 0.0 <= res[ranking]["metrics"]["HR@20"] <= 1.0


def test_scales_released_settings_and_experiment_names(backbone, tmp_path):
    cpu = reproduce_module.SCALES["cpu"]
    assert cpu.batch_size * 30 == cpu.train_samples and cpu.g < cpu.max_items
    assert all(0 < n for n in cpu.long_lengths[:-1]) and cpu.long_lengths[-1] == 0
    paper = reproduce_module.SCALES["paper"]
    assert paper.max_items == 100 and paper.train_samples == 0 and paper.exact
    assert (paper.long_lengths, paper.long_k) == ((150, 350, 0), 20)
    assert released("ml-100k", "pft-s")["lr"] == 3e-6 and released("ml-100k", "pft-i")["lr"] == 1e-5
    assert released("goodreads", "pft-i")["batch_size"] == 32 and released("ml-1m", "pretrain")["lr"] == 8e-6
    with pytest.raises(ValueError, match="preset"):
        released("synthetic", "pft-i")
    assert parse_experiments("long, table2") == ("table2", "long") and parse_experiments("all") == EXPERIMENTS
    with pytest.raises(ValueError, match="--experiments"):
        parse_experiments("table2,table5")
    # Checkpoints of Llama-3.2-1B (1.24B parameters) over an ML-1M stage (8,347 steps): 10 per stage asked,
    # every 835 steps (9 fit), 14.8 GB each, 2 kept.
    size = ModelSize(1_235_820_544, 973_146_112, 262_674_432)
    plan = checkpoint_plan(size, 8347, 10, 2)
    assert (plan["save_every"], plan["checkpoints"]) == (835, 9)
    assert (round(plan["checkpoint_gb"], 2), round(plan["peak_gb"], 2)) == (14.83, 29.66)
    assert checkpoint_plan(size, 8347, 0, 2)["checkpoints"] == 0 and save_every(3, 10) == 1
    # --authors-code: the released pre-training never compresses (p = 0); otherwise the curriculum.
    for authors, p in ((True, 0.0), (False, None)):
        job = Reproduction("synthetic", str(backbone), tmp_path / str(authors), SMOKE, preset="ml-100k",
                           authors_code=authors)  # fmt: skip
        assert job.stage_config("pretrain").p == p and job.stage_config("pft-i").p is None
