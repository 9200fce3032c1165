"""``patchrec.experiments.gpu_plan`` / ``patchrec bench plan-gpu``: the meta-device trace of a training and an
evaluation step. Its FLOPs equal an analytic count and the FLOPs torch counts on a real CPU run of the same
batches; its memory components add up to the parameter count; the command runs on a tiny release."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_data import build_tiny_tokenizer, tiny_dataset
from torch.utils.flop_counter import FlopCounterMode

from patchrec.batching.pack import iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.cli import main
from patchrec.data.dataset import make_samples
from patchrec.data.release import write_release
from patchrec.experiments import gpu_plan, gpu_plan_check
from patchrec.model.decoder import ModelPreset, PackedDecoder, llama_config
from patchrec_kernels.varlen_ops import attention_pairs

# Odd sizes: 3 query heads of 12 over 1 key/value head, MLP 40, 2 layers.
PRESET = ModelPreset(36, 40, 2, 3, 1, 512, 10000.0, True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    dataset = tiny_dataset(seed=3, num_users=10, max_len=30)
    tokens = tokenize_dataset(load_tokenizer(tok_dir), dataset)
    return tok_dir, dataset, tokens, llama_config(PRESET, tokens.vocab_size)


def analytic_flops(config, batches, *, train: bool) -> int:
    """Matmuls (2 FLOPs per multiply-add): every layer's linear maps on every row, the head on the label rows
    (training) or each prompt's last row (evaluation), attention's q k^T and p v over each sequence's causal
    (query, key) pairs, and patch_embed's scale-and-add per token and column; backward doubles the linear
    maps (input and weight gradients), adds 5 attention matmuls and patch_embed's mirror image."""
    d, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads, head_dim = config.num_attention_heads, d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    body = layers * (d * d + 2 * d * kv + d * d + 3 * d * config.intermediate_size)
    passes, attention, embed = (3, 7, 4) if train else (1, 2, 2)
    total = 0
    for b in batches:
        rows, tokens = b.num_rows, int(b.token_ids.numel())
        heads_rows = int(b.label_rows.numel()) if train else b.num_sequences
        pairs = attention_pairs(b.cu_seqlens, None, b.max_seqlen, b.max_seqlen, rows, True)
        total += passes * 2 * (rows * body + heads_rows * d * v)
        total += layers * attention * 2 * heads * head_dim * pairs + embed * tokens * d
    return total


@pytest.mark.parametrize("plan", ["vanilla", "pft-s"])
def test_train_flops_equal_analytic_count_and_cpu_run(tiny, plan):
    _, dataset, tokens, config = tiny
    settings = gpu_plan.StepSettings(plan, 20, 2, 3, batch_size=5, max_rows=500)
    samples = make_samples(dataset, "train", 20)
    result = gpu_plan.project_train(config, tokens, samples, settings)
    batches = gpu_plan.train_batches(samples, tokens, settings)
    assert result["micro_batches"] == len(batches) > 1  # several micro-batches, attention rescaled in each
    assert result["flops"] == analytic_flops(config, batches, train=True)
    model = PackedDecoder.from_preset(PRESET, tokens.vocab_size)  # real weights, CPU: exact offsets
    with FlopCounterMode(display=False) as counter:
        for batch in batches:
            model(batch).loss.backward()
    assert result["flops"] == counter.get_total_flops()
    assert result["rows"] == sum(b.num_rows for b in batches)
    assert result["seconds"]["A100"] > result["seconds"]["H100"] > 0
    assert result["bytes"] > 0


def test_eval_prompt_flops_equal_analytic_count(tiny):
    _, dataset, tokens, config = tiny
    settings = gpu_plan.StepSettings("pft-i", 20, 2, 3, batch_size=5, max_rows=2000, beams=4, steps=0)
    samples = make_samples(dataset, "test", 20)
    result = gpu_plan.project_eval(config, tokens, samples, settings)
    batch = next(iter_batches(samples, make_planner("pft-i", k=2), tokens, 2000, answer=False))
    assert result["sequences"] == batch.num_sequences > 1
    assert result["flops"] == analytic_flops(config, [batch], train=False)
    with_steps = gpu_plan.project_eval(config, tokens, samples, gpu_plan.StepSettings(
        "pft-i", 20, 2, 3, batch_size=5, max_rows=2000, beams=4, steps=3))  # fmt: skip
    # Each beam step runs every layer and the head on one row per beam, at least.
    d, v = config.hidden_size, config.vocab_size
    assert with_steps["flops"] - result["flops"] > 3 * batch.num_sequences * 4 * 2 * d * v
    assert with_steps["memory"]["beam_kv"] > 0 == result["memory"]["beam_kv"]


def test_memory_components_add_up(tiny):
    _, dataset, tokens, config = tiny
    params = sum(p.numel() for p in PackedDecoder.from_preset(PRESET, tokens.vocab_size).parameters())
    samples = make_samples(dataset, "train", 20)
    out = {}
    for plan in ("vanilla", "pft-s"):
        settings = gpu_plan.StepSettings(plan, 20, 2, 3, batch_size=5, max_rows=5000)
        out[plan] = r = gpu_plan.project_train(config, tokens, samples, settings)
        assert r["params"] == params
        assert r["memory"]["master_fp32"] == 4 * params and r["memory"]["adamw_fp32"] == 8 * params
        assert r["memory"]["grad_fp32"] == 4 * params and r["memory"]["autocast_bf16"] == 2 * params
        assert r["memory"]["grad_accumulation"] == 0  # one micro-batch: nothing is summed into
        assert r["memory"]["adamw_temporary"] == 4 * params
        # master, two moments, the bf16 copy; then the backward (one micro-batch: no gradients yet) or
        # AdamW's step (gradients and its temporary)
        assert r["memory_total"] == 14 * params + max(r["memory"]["activations"], 8 * params)
    # One micro-batch each: fewer rows, fewer saved activations.
    assert out["pft-s"]["micro_batches"] == out["vanilla"]["micro_batches"] == 1
    assert out["pft-s"]["rows"] < out["vanilla"]["rows"]
    assert 0 < out["pft-s"]["memory"]["activations"] < out["vanilla"]["memory"]["activations"]


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    with gpu_plan.SavedBytes() as saved:
        y = (x * x).sum() + (x @ w).sum()  # saves x (twice) and w
    y.backward()
    assert saved.total == (7 * 5 + 5 * 3) * 4
    with gpu_plan.SavedBytes(exclude=[w]) as saved:
        (x @ w).sum().backward()
    assert saved.total == 7 * 5 * 4


def test_step_settings_reject_bad_values():
    with pytest.raises(ValueError, match="plan"):
        gpu_plan.StepSettings("persrec", 20, 2, 3, 5, 100)
    with pytest.raises(ValueError, match="batch_size"):
        gpu_plan.StepSettings("vanilla", 20, 2, 3, 0, 100)


def test_plan_gpu_command_on_tiny_release(tiny, tmp_path, capsys):
    tok_dir, dataset, tokens, _ = tiny
    write_release(dataset, tmp_path / "tiny")
    out = tmp_path / "plan.json"
    argv = ["bench", "plan-gpu", "--data", str(tmp_path / "tiny"), "--tokenizer", str(tok_dir), "--model",
            "tiny", "--max-items", "20", "--batch-size", "4", "--g", "3", "--max-rows", "400", "--beams", "2",
            "--steps", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    heads = [line for line in text.splitlines() if line.startswith(("PROJECTED vanilla", "PROJECTED pft"))]
    assert len(heads) == 6  # train and eval per plan, each labelled
    table = text[text.index("PROJECTED summary") :].splitlines()
    assert [row.split(" | ")[0] for row in table[3:6]] == ["| vanilla", "| pft-i", "| pft-s"]
    data = json.loads(out.read_text())
    assert [r["plan"] for r in data["results"]] == ["vanilla", "vanilla", "pft-i", "pft-i", "pft-s", "pft-s"]
    assert all(r["projected"] and r["flops"] > 0 for r in data["results"])
    assert data["config"]["model"] == "tiny" and data["config"]["preset"] is None
    assert main(argv[:10]) == 2  # not a released dataset, no batch or G given
    assert "pass --batch-size and --g" in capsys.readouterr().err
    assert main([*argv, "--plans", "vanilla,nope"]) == 2
    assert "plan must be one of" in capsys.readouterr().err
    assert np.isfinite(data["results"][0]["seconds"]["H100"])


# Wider than PRESET: the trace leaves out the temporaries inside one op, which only a toy width (36) lets
# outweigh the weights and saved activations (1.2x there with the CPU attention backend, 1.8x with the
# reference's score blocks); the tiny preset and SmolLM2 are checked by benches/gpu_plan_check.py.
WIDE = ModelPreset(192, 520, 2, 3, 1, 512, 10000.0, True)


@pytest.mark.parametrize("plan, max_rows", [("vanilla", 5000), ("pft-s", 200)])
def test_estimator_matches_a_measured_cpu_step(tiny, plan, max_rows, reference_ops):
    """The fp32 trace of the batches a real CPU step runs: the same FLOPs op by op, and a peak within the
    tolerance of the profiler's measured peak (one micro-batch, and several: the gradients then coexist
    with the activations). ``reference_ops``: the profiler would record every step of the Triton
    interpreter."""
    _, dataset, tokens, config = tiny
    settings = gpu_plan.StepSettings(plan, 20, 2, 3, batch_size=5, max_rows=max_rows)
    batches = gpu_plan.train_batches(make_samples(dataset, "train", 20), tokens, settings)
    assert (len(batches) > 1) == (max_rows < 5000)
    model = PackedDecoder.from_preset(WIDE, tokens.vocab_size)
    out = gpu_plan_check.check_train_step(model, batches)
    assert out["flops_equal_on_common_ops"] and not out["flops_only_measured"]
    assert set(out["flops_only_projected"]) <= {"patchrec.patch_embed", "patchrec.patch_embed_backward"}
    assert abs(out["flops_ratio"] - 1) < 1e-3
    peak = out["measured"]["memory_peak"]
    # the weights (torch also files some buffers, e.g. the rotary frequencies, as parameters)
    assert peak["parameter"] >= 4 * out["params"]
    assert peak["total"] == sum(v for k, v in peak.items() if k != "total")
    assert out["memory_within_tolerance"], (out["memory_ratio"], peak, out["projected"])


def test_peak_by_category_reads_the_largest_point():
    columns = len(gpu_plan_check.TIMELINE_CATEGORIES) + 1
    low, high = [0, 5] + [1] * (columns - 2), [0, 7] + [2] * (columns - 2)
    peak = gpu_plan_check.peak_by_category([[1, 2, 3], [low, high, low]])
    assert peak["parameter"] == 7 and peak["unknown"] == 2 and peak["total"] == sum(high)
    with pytest.raises(ValueError, match="columns"):
        gpu_plan_check.peak_by_category([[1], [[0, 1]]])
    with pytest.raises(ValueError, match="fp32"):
        gpu_plan_check.check_train_step(PackedDecoder.from_preset(PRESET, 300).to(torch.bfloat16), [])
