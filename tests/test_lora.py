"""LoRA through peft: what trains (adapters and the chosen embedding rows, nothing else), adapter directories
(checkpoints, ``--save adapter``) and merged models giving the same scores, exact resume, the CLI and its
errors. DDP with LoRA on 2 ranks is in ``tests/test_distributed.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import patchrec.train.loop as train_module
from patchrec.batching.pack import iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import HISTORY_MARKERS, load_tokenizer, tokenize_dataset
from patchrec.cli import main
from patchrec.data.dataset import make_samples
from patchrec.eval.exact import CatalogTitles, score_titles
from patchrec.model.decoder import PackedDecoder
from patchrec.model.lora import is_adapter_dir, load_model, merge_lora
from patchrec.train.checkpoint import save_model_dir
from patchrec.train.config import TrainConfig, preset
from patchrec.train.loop import latest_checkpoint, train
from patchrec.train.stage_inputs import load_dataset

SMALL = dict(data="synthetic", synthetic_users=40, synthetic_items=60, synthetic_length=16.0,
             synthetic_topics=6, tokenizer_vocab=300, max_items=12, max_rows=1600, progress=False)
LORA = dict(stage="pft-i", lora_r=4, batch_size=6, max_steps=2, save="adapter", save_every=1)

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


def lora_config(tmp_path, name: str, **overrides) -> TrainConfig:
    return preset("tiny", **(SMALL | LORA | {"out": str(tmp_path / name)} | overrides))


def base_and_tokens(config: TrainConfig):
    """The run's random-init base model (as the loop builds it) and its tokenisation."""
    tok = load_tokenizer(f"{config.out}/tokenizer")
    tokens = tokenize_dataset(tok, load_dataset(config))
    return PackedDecoder.from_preset("tiny", tokens.vocab_size, seed=config.seed), tok, tokens


@pytest.mark.parametrize("train_embeddings", ["none", "new", "all"])
def test_two_lora_steps_change_only_adapters_and_the_chosen_rows(tmp_path, train_embeddings, monkeypatch):
    config = lora_config(tmp_path, train_embeddings, train_embeddings=train_embeddings)
    live = {}
    real_save = train_module.save_model_dir

    def spy(path, model, tokenizer, **kwargs):
        if path.name == "model":  # the final save: the trained model itself, merged here
            live["merged"] = merge_lora(model).state_dict()
        return real_save(path, model, tokenizer, **kwargs)

    monkeypatch.setattr(train_module, "save_model_dir", spy)
    result = train(config)
    assert result.step == 2 and np.isfinite(result.final_loss)
    model_dir = tmp_path / train_embeddings / "model"
    assert is_adapter_dir(model_dir) and not list(model_dir.glob("model*.safetensors"))
    weights = load_file(str(model_dir / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    checkpoint = latest_checkpoint(tmp_path / train_embeddings)
    assert is_adapter_dir(checkpoint) and (checkpoint / "trainer_state.pt").is_file()

    base, tok, _ = base_and_tokens(config)
    lora = load_model(model_dir)
    # What was saved (adapters + embedding rows that differ from the base) rebuilds the trained model.
    for name, value in merge_lora(lora).state_dict().items():
        torch.testing.assert_close(value, live["merged"][name], rtol=0, atol=0, msg=name)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable - {"lm.model.embed_tokens.weight"})
    assert ("lm.model.embed_tokens.weight" in trainable) == (train_embeddings != "none")
    # Adapters start at B = 0: after 2 steps every B has moved.
    assert all(p.abs().max() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    merged = live["merged"]
    changed = {n for n, p in base.state_dict().items() if not torch.equal(p, merged[n])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    table = "lm.model.embed_tokens.weight"
    tables = {table, "lm.lm_head.weight"}  # the tiny preset ties the output head to the table
    # Every adapted projection moved; nothing else did, except the table as asked.
    projections = {n for n in merged if n.endswith(tuple(f"{t}.weight" for t in targets))}
    assert changed - tables == projections
    moved_rows = set(torch.nonzero((merged[table] != base.state_dict()[table]).any(dim=1)).ravel().tolist())
    new_rows = set(tok.convert_tokens_to_ids(list(HISTORY_MARKERS)))
    if train_embeddings == "none":
        assert not moved_rows
    elif train_embeddings == "new":
        assert moved_rows == new_rows
    else:
        assert new_rows < moved_rows and len(moved_rows) > 50


def test_merged_and_unmerged_scores_are_equal_and_eval_loads_either(tmp_path, capsys):
    config = lora_config(tmp_path, "run", lr=2e-2)
    train(config)
    lora = load_model(tmp_path / "run" / "model").eval()
    merged = merge_lora(lora).eval()
    _, tok, tokens = base_and_tokens(config)
    samples = make_samples(load_dataset(config), "test", config.max_items)
    catalog = CatalogTitles.from_table(tokens.titles)
    (batch,) = list(iter_batches(samples, make_planner("pft-i"), tokens, 10**6, order=np.arange(3),
                                 answer=False))  # fmt: skip
    with torch.no_grad():
        a = score_titles(lora, batch, catalog, tokens.prompt.eot, max_rows=4000)
        b = score_titles(merged, batch, catalog, tokens.prompt.eot, max_rows=4000)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert a.std(dim=1).min() > 1e-3

    save_model_dir(tmp_path / "merged", merged, tok)
    results = {}
    for name, path in (("adapter", tmp_path / "run"), ("merged", tmp_path / "merged")):
        out = tmp_path / f"{name}.json"
        args = ["eval", "--model", str(path), "--data", "synthetic", "--out", str(out), "--limit", "5",
                "--no-progress"]  # fmt: skip
        assert main(args) == 0
        results[name] = json.loads(out.read_text())
    capsys.readouterr()
    assert results["adapter"]["ranks"] == results["merged"]["ranks"]


def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, save_every=0, train_embeddings="new")
    full = train(lora_config(tmp_path, "full", **common))
    first = train(lora_config(tmp_path, "split", halt_after=2, **common))
    assert first.model_dir is None and is_adapter_dir(latest_checkpoint(tmp_path / "split"))
    second = train(lora_config(tmp_path, "split", **common), resume=True)
    resumed = first.step_losses | second.step_losses
    np.testing.assert_allclose([resumed[s] for s in range(1, 5)], [full.step_losses[s] for s in range(1, 5)],
                               rtol=0, atol=1e-6)  # fmt: skip
    a = load_file(str(full.model_dir / "adapter_model.safetensors"))
    b = load_file(str(second.model_dir / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_merged_lora_run_is_a_plain_model_and_the_next_stage_starts_from_an_adapter(tmp_path):
    first = train(lora_config(tmp_path, "one", save="merged", max_steps=1, save_every=0))
    assert (first.model_dir / "config.json").is_file() and not is_adapter_dir(first.model_dir)
    assert type(PackedDecoder.from_pretrained(first.model_dir).lm).__name__ == "LlamaForCausalLM"
    adapter = train(lora_config(tmp_path, "two", max_steps=1, save_every=0))
    # A LoRA stage on top of an adapter run: its base is the first run's merged model.
    second = train(lora_config(tmp_path, "three", init=str(tmp_path / "two"), max_steps=1, save_every=0))
    record = json.loads((second.model_dir / "patchrec_adapter.json").read_text())
    assert record["base"] == {"path": str(adapter.model_dir.resolve())}
    assert load_model(second.model_dir, merge=True).vocab_size == record["vocab_size"]


def test_lora_flags_and_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--lora-alpha is only for LoRA"):
        TrainConfig(lora_alpha=8.0)
    with pytest.raises(ValueError, match="--save adapter is only for LoRA"):
        TrainConfig(save="adapter")
    with pytest.raises(ValueError, match="--train-embeddings must be one of"):
        TrainConfig(lora_r=4, train_embeddings="some")
    with pytest.raises(ValueError, match="--parallel fsdp is not supported"):
        TrainConfig(lora_r=4, parallel="fsdp")
    with pytest.raises(ValueError, match="--lora-r must be >= 0"):
        TrainConfig(lora_r=-1)
    args = ["train", "--stage", "pft-i", "--data", "synthetic", "--preset", "tiny", "--synthetic-users", "20",
            "--synthetic-items", "20", "--max-items", "6", "--max-steps", "1", "--batch-size", "4",
            "--lora-r", "2", "--lora-alpha", "3", "--lora-targets", "q_proj", "v_proj", "--train-embeddings",
            "none", "--save", "adapter", "--out", str(tmp_path / "cli"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    saved = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    assert saved["lora_r"] == 2 and saved["lora_targets"] == ["q_proj", "v_proj"]
    assert saved["save"] == "adapter"
    record = json.loads((tmp_path / "cli" / "model" / "patchrec_adapter.json").read_text())
    want = {"r": 2, "alpha": 3.0, "targets": ["q_proj", "v_proj"], "train_embeddings": "none"}
    assert record["lora"] == want
    assert main(args[:-3] + ["--lora-alpha", "3", "--out", str(tmp_path / "x"), "--lora-r", "0"]) == 2
    assert "--lora-alpha is only for LoRA" in capsys.readouterr().err
