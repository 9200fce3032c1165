"""Loading a backbone: a checkpoint of a decoder family patchrec does not run exactly never loads as the
wrong model (it would drop Qwen2's q/k/v biases or Qwen3's q/k norms without an error)."""

from __future__ import annotations

import pytest
import torch
from tiny_data import build_tiny_tokenizer
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from patchrec.cli import main
from patchrec.model.backbone import load_causal_lm
from patchrec.model.llama import PackedLlama

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "Qwen2ForCausalLM"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, "Qwen3ForCausalLM"),
    "mistral": (MistralConfig, MistralForCausalLM, "MistralForCausalLM"),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, "Gemma2ForCausalLM"),
}


def save_tiny(config_cls, model_cls, path):
    torch.manual_seed(0)
    model_cls(config_cls(**TINY)).save_pretrained(path)
    build_tiny_tokenizer(path)  # a tokenizer beside it, as a real checkpoint has
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_unsupported_family_is_refused_by_name(family, tmp_path):
    config_cls, model_cls, arch = FAMILIES[family]
    path = save_tiny(config_cls, model_cls, tmp_path / family)
    with pytest.raises(ValueError, match=rf"{arch}.*model_type '{family}'.*supported: llama"):
        load_causal_lm(path)
    with pytest.raises(ValueError, match=arch):
        PackedLlama.from_pretrained(path)


def test_train_and_eval_commands_refuse_a_qwen_checkpoint(tmp_path, capsys):
    path = save_tiny(Qwen2Config, Qwen2ForCausalLM, tmp_path / "qwen2")
    train = ["train", "--stage", "vanilla", "--data", "synthetic", "--init", str(path), "--out",
             str(tmp_path / "run"), "--synthetic-users", "20", "--synthetic-items", "20", "--max-items", "6",
             "--max-steps", "1", "--no-progress"]  # fmt: skip
    assert main(train) == 2
    assert "Qwen2ForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()
    evaluate = ["eval", "--model", str(path), "--data", "synthetic", "--out", str(tmp_path / "ev.json"),
                "--max-items", "6", "--limit", "2", "--no-progress"]
    assert main(evaluate) == 2
    assert "Qwen2ForCausalLM" in capsys.readouterr().err


def test_a_llama_checkpoint_still_loads(tmp_path):
    path = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    assert isinstance(load_causal_lm(path), LlamaForCausalLM)
