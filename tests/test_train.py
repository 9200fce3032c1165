"""Training stages on the packed path: exact resume, learning, atomic checkpoints, stage chaining, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import patchrec.train.loop as train_module
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.cli import main
from patchrec.data.dataset import make_samples
from patchrec.model.decoder import PackedLlama
from patchrec.train.config import PRESETS, TrainConfig, preset
from patchrec.train.loop import (
    latest_checkpoint,
    load_trainer_state,
    step_micro_batches,
    total_steps_of,
    train,
)
from patchrec.train.stage_inputs import load_dataset

# A small synthetic problem: ~150-row samples, a few per micro-batch, a 300-id title BPE.
SMALL = dict(data="synthetic", synthetic_users=40, synthetic_items=60, synthetic_length=16.0,
             synthetic_topics=6, tokenizer_vocab=300, max_items=12, max_rows=1600, progress=False)


pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


def small_config(tmp_path, name: str, **overrides) -> TrainConfig:
    return preset("tiny", **(SMALL | {"out": str(tmp_path / name)} | overrides))


def test_exact_resume_reproduces_the_uninterrupted_run(tmp_path):
    # pretrain: random plans with the curriculum and two views, the hardest case for a resumed data stream;
    # ~300-row two-view samples, 8 per step in 1600-row micro-batches: several micro-batches per step.
    common = dict(stage="pretrain", max_steps=6, batch_size=8, save_every=0)
    full = train(small_config(tmp_path, "full", **common))
    assert sorted(full.step_losses) == list(range(1, 7))

    first = train(small_config(tmp_path, "split", halt_after=3, **common))
    assert first.model_dir is None and sorted(first.step_losses) == [1, 2, 3]
    assert latest_checkpoint(tmp_path / "split").name == "step-000003"
    second = train(small_config(tmp_path, "split", **common), resume=True)
    assert sorted(second.step_losses) == [4, 5, 6] and second.model_dir is not None

    resumed = first.step_losses | second.step_losses
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [full.step_losses[s] for s in range(1, 7)],
                               rtol=0, atol=1e-6)
    a = PackedLlama.from_pretrained(full.model_dir).state_dict()
    b = PackedLlama.from_pretrained(second.model_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # The log keeps exactly one line per logged step across the interruption.
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_loss_decreases_on_a_small_problem(tmp_path):
    result = train(small_config(tmp_path, "learn", stage="vanilla", max_steps=30, lr=3e-3))
    losses = [result.step_losses[s] for s in range(1, 31)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert result.rows_per_s > 0 and result.samples_per_s > 0
    config = json.loads((tmp_path / "learn" / "train_config.json").read_text())
    assert config["stage"] == "vanilla" and config["tokenizer"].endswith("tokenizer")


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = small_config(tmp_path, "crash", stage="pft-i", max_steps=4, save_every=2, k=3)
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies half-written
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config)
    monkeypatch.setattr(train_module.torch, "save", real_save)

    ckpt = latest_checkpoint(tmp_path / "crash")
    assert ckpt is not None and ckpt.name == "step-000002"
    assert not (tmp_path / "crash" / "checkpoints" / "step-000004").exists()
    assert load_trainer_state(ckpt)["position"]["step"] == 2
    PackedLlama.from_pretrained(ckpt)  # the model files are complete

    resumed = train(config, resume=True)
    reference = train(config.replace(out=str(tmp_path / "ref"), save_every=0))
    assert sorted(resumed.step_losses) == [3, 4]
    for step in (3, 4):
        assert abs(resumed.step_losses[step] - reference.step_losses[step]) <= 1e-6
    assert not list((tmp_path / "crash" / "checkpoints").glob(".*tmp"))  # the leftover was replaced


def test_stage_two_starts_from_the_stage_one_run(tmp_path):
    stage1 = train(small_config(tmp_path, "s1", stage="pretrain", max_steps=3))
    stage2_config = small_config(tmp_path, "s2", stage="pft-i", k=3, max_steps=2, init=str(tmp_path / "s1"))
    stage2 = train(stage2_config)
    # The stage-2 tokenizer is the one saved with the stage-1 model.
    saved = json.loads((tmp_path / "s2" / "train_config.json").read_text())
    assert saved["tokenizer"] == str(stage1.model_dir)

    # Stage 2's first loss is the stage-1 model's loss on stage 2's first step: it starts from those weights.
    tok = load_tokenizer(stage1.model_dir)
    dataset = load_dataset(stage2_config)
    tokens = tokenize_dataset(tok, dataset)
    samples = make_samples(dataset, "train", stage2_config.max_items)
    micro = step_micro_batches(stage2_config, samples, make_planner("pft-i", k=3), tokens, 0, 2)
    model = PackedLlama.from_pretrained(stage1.model_dir)
    with torch.no_grad():
        losses = torch.cat([model(b).label_loss for b in micro])
    assert abs(stage2.step_losses[1] - float(losses.mean())) < 1e-5


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--stage", "vanilla", "--data", "synthetic", "--preset", "tiny", "--out", str(out),
            "--synthetic-users", "30", "--synthetic-items", "40", "--synthetic-length", "12",
            "--synthetic-topics", "4", "--tokenizer-vocab", "280", "--max-items", "8", "--max-rows", "600",
            "--max-steps", "2", "--no-progress"]
    assert main(argv + ["--val-every", "2", "--val-samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "finished at step 2/2" in printed and "validation: HR@10" in printed
    val = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if "HR@10" in ln]
    assert [v["step"] for v in val] == [2] and val[0]["val_plan"] == "vanilla"
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    saved = TrainConfig.from_json(out / "train_config.json")
    assert saved.stage == "vanilla" and saved.lr == PRESETS["tiny"]["lr"] and saved.max_steps == 2

    bad = argv[:-1] + ["--init", str(tmp_path / "missing")]
    assert main(bad) == 2
    assert "missing" in capsys.readouterr().err


def test_config_round_trip_and_bad_values(tmp_path):
    config = preset("ml-1m", stage="pft-s", out=str(tmp_path))
    assert config.lr == 8e-6 and config.grad_clip == 0.3 and config.warmup_ratio == 0.05
    assert config.batch_size == 64 and preset("goodreads").batch_size == 32
    config.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="sft")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="save_dtype"):
        TrainConfig(save_dtype="fp16")
    with pytest.raises(ValueError, match="preset"):
        preset("ml-20m")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TrainConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="bf16"):
        train(small_config(tmp_path, "bf16", dtype="bf16", device="cpu", max_steps=1))


@pytest.fixture(scope="module")
def small_tokens(tmp_path_factory):
    config = preset("tiny", **(SMALL | {"out": str(tmp_path_factory.mktemp("tok")), "max_steps": 1}))
    from patchrec.batching.tokenizer_train import train_title_tokenizer

    dataset = load_dataset(config)
    tok_dir = tmp_path_factory.mktemp("bpe")
    train_title_tokenizer(dataset.titles, tok_dir, config.tokenizer_vocab,
                          extra_texts=[dataset.system_prompt, dataset.user_prompt])  # fmt: skip
    return config, dataset, tokenize_dataset(load_tokenizer(tok_dir), dataset)


def test_a_step_is_the_same_samples_for_every_plan(small_tokens):
    """Defect: a step used to be a row budget, so PFT-S steps held several times the samples of vanilla ones.
    Now every plan's step s holds the same batch_size samples, split over as many micro-batches as needed."""
    config, dataset, tokens = small_tokens
    config = config.replace(batch_size=7, epochs=2, max_steps=0)
    samples = make_samples(dataset, "train", config.max_items)
    total = total_steps_of(config, len(samples))
    assert total == 2 * -(-len(samples) // 7)
    per_plan = {}
    for name in ("vanilla", "pft-i", "pft-s", "pretrain", "dropout"):
        planner = make_planner(name, k=3, g=3)
        steps = []
        for step in (0, 1, total // 2 - 1, total // 2, total - 1):
            micro = step_micro_batches(config, samples, planner, tokens, step, total)
            ids = torch.cat([b.sample_ids for b in micro])
            assert all(b.num_rows <= config.max_rows for b in micro)
            # every sample of the step once per view, views of a sample next to each other
            by_sample = ids.view(-1, planner.views)
            assert torch.equal(by_sample, by_sample[:, :1].expand(-1, planner.views))
            steps.append(sorted(ids[:: planner.views].tolist()))
        per_plan[name] = steps
    for name, steps in per_plan.items():
        assert steps == per_plan["vanilla"], name
    full, last_epoch_end = per_plan["vanilla"][0], per_plan["vanilla"][2]
    assert len(full) == 7 and len(last_epoch_end) == len(samples) - 7 * (total // 2 - 1)
    # the second epoch visits the samples in another order
    assert per_plan["vanilla"][3] != per_plan["vanilla"][0]


def test_curriculum_follows_the_optimizer_step_across_epochs(tmp_path, monkeypatch):
    """Defect: p was the position in the epoch, so it restarted every epoch and stopped early under
    max_steps. p must be step / total steps of the run."""
    seen = []
    real = train_module.iter_batches

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "iter_batches", spy)
    result = train(small_config(tmp_path, "curr", stage="pretrain", train_samples=12, batch_size=6,
                                max_steps=5))  # fmt: skip
    assert result.step == 5 and result.samples_trained == 5 * 6  # two steps per epoch, 2.5 epochs
    assert seen == [s / 5 for s in range(5)]


def test_weights_stay_fp32_from_a_bf16_checkpoint(tmp_path):
    """Defect: a bf16 init trained and saved in bf16, so most fine-tuning updates rounded away."""
    init = tmp_path / "bf16-init"
    PackedLlama.from_preset("tiny", 400, seed=0).save_pretrained(init, dtype=torch.bfloat16)
    first = PackedLlama.from_pretrained(init)
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    from patchrec.batching.tokenizer_train import train_title_tokenizer

    config = small_config(tmp_path, "fp32", stage="vanilla", init=str(init), max_steps=2, lr=1e-5,
                          tokenizer=str(tmp_path / "bpe"))  # fmt: skip
    dataset = load_dataset(config)
    train_title_tokenizer(dataset.titles, tmp_path / "bpe", config.tokenizer_vocab)
    result = train(config)
    trained = PackedLlama.from_pretrained(result.model_dir)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    before = first.lm.state_dict()
    changed = [float((trained.lm.state_dict()[n].float() != before[n].float()).float().mean())
               for n in before if ".layers." in n and n.endswith(".weight") and "norm" not in n]  # fmt: skip
    assert min(changed) > 0.9, changed
    again = train(config.replace(out=str(tmp_path / "bf16-out"), save_dtype="bf16"))
    assert {p.dtype for p in PackedLlama.from_pretrained(again.model_dir).parameters()} == {torch.bfloat16}


def test_default_synthetic_data_is_the_same_in_every_command():
    """`patchrec train --data synthetic` trains on what `patchrec eval/baseline --data synthetic` read."""
    from patchrec.data.source import load_data

    a, b = load_dataset(TrainConfig(data="synthetic", seed=7)), load_data("synthetic")
    assert a.titles == b.titles and np.array_equal(a.items, b.items)
    assert np.array_equal(a.user_offsets, b.user_offsets)
