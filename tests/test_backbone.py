"""Loading a backbone: every checkpoint loads as its own family's transformers class or not at all. An
unsupported family (or an attention feature patchrec does not implement) is a ValueError naming it, never a
model with weights silently dropped (as Qwen2's q/k/v biases or Qwen3's q/k norms were when everything
loaded as Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_data import build_tiny_tokenizer
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from patchrec.cli import main
from patchrec.model.backbone import SUPPORTED_ARCHITECTURES, load_causal_lm
from patchrec.model.decoder import PackedDecoder, PackedLlama

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
SUPPORTED = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 8}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 8, "attn_logit_softcapping": None}),
}


def save_tiny(config_cls, model_cls, path, **extra):
    torch.manual_seed(0)
    model_cls(config_cls(**TINY, **extra)).save_pretrained(path)
    build_tiny_tokenizer(path)  # a tokenizer beside it, as a real checkpoint has
    return path


def test_an_unsupported_family_is_refused_by_name(tmp_path):
    path = save_tiny(Phi3Config, Phi3ForCausalLM, tmp_path / "phi3", pad_token_id=0)
    supported = r"supported: llama \(LlamaForCausalLM\), mistral.*qwen2.*qwen3.*gemma3_text"
    refused = r"Phi3ForCausalLM \(model_type 'phi3'\) is not supported; "
    with pytest.raises(ValueError, match=refused + supported):
        load_causal_lm(path)
    with pytest.raises(ValueError, match="Phi3ForCausalLM"):
        PackedDecoder.from_pretrained(path)
    with pytest.raises(ValueError, match="model_type 'phi3'"):
        PackedDecoder(Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0)))
    # A model_type transformers does not know at all: still our error, naming it.
    made_up = tmp_path / "made_up"
    made_up.mkdir()
    (made_up / "config.json").write_text(json.dumps({"model_type": "llamalike", "architectures": ["X"]}))
    with pytest.raises(ValueError, match=r"architecture X \(model_type 'llamalike'\) is not supported"):
        load_causal_lm(made_up)
    # A listed architecture that contradicts the model_type.
    lying = save_tiny(Qwen2Config, Qwen2ForCausalLM, tmp_path / "lying")
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*model_type 'qwen2'"):
        load_causal_lm(lying)


def test_gemma2_attention_softcapping_is_refused_by_feature(tmp_path):
    path = save_tiny(Gemma2Config, Gemma2ForCausalLM, tmp_path / "gemma2", head_dim=8)
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM uses attention logit soft-capping "
                                         r"\(attn_logit_softcapping=50.0\)"):  # fmt: skip
        load_causal_lm(path)
    bidirectional = save_tiny(Gemma3TextConfig, Gemma3ForCausalLM, tmp_path / "gemma3", head_dim=8,
                              use_bidirectional_attention=True)  # fmt: skip
    with pytest.raises(ValueError, match="bidirectional attention"):
        PackedDecoder.from_pretrained(bidirectional)


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_a_supported_family_loads_as_its_own_class(family, tmp_path):
    config_cls, model_cls, extra = SUPPORTED[family]
    path = save_tiny(config_cls, model_cls, tmp_path / family, **extra)
    lm = load_causal_lm(path)
    assert type(lm) is model_cls and SUPPORTED_ARCHITECTURES[family] == model_cls.__name__
    reference = model_cls.from_pretrained(path)
    for (name, p), (_, q) in zip(lm.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # every weight arrives (biases, q/k norms included)
    assert PackedLlama is PackedDecoder and type(PackedDecoder.from_pretrained(path).lm) is model_cls


def test_train_and_eval_commands_refuse_an_unsupported_checkpoint(tmp_path, capsys):
    path = save_tiny(Phi3Config, Phi3ForCausalLM, tmp_path / "phi3", pad_token_id=0)
    train = ["train", "--stage", "vanilla", "--data", "synthetic", "--init", str(path), "--out",
             str(tmp_path / "run"), "--synthetic-users", "20", "--synthetic-items", "20", "--max-items", "6",
             "--max-steps", "1", "--no-progress"]  # fmt: skip
    assert main(train) == 2
    assert "Phi3ForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()
    evaluate = ["eval", "--model", str(path), "--data", "synthetic", "--out", str(tmp_path / "ev.json"),
                "--max-items", "6", "--limit", "2", "--no-progress"]
    assert main(evaluate) == 2
    assert "Phi3ForCausalLM" in capsys.readouterr().err


def test_a_qwen3_checkpoint_trains_and_evaluates_as_qwen3(tmp_path, reference_ops_one_thread):
    path = save_tiny(Qwen3Config, Qwen3ForCausalLM, tmp_path / "qwen3", head_dim=8)
    run = tmp_path / "run"
    train = ["train", "--stage", "pft-i", "--data", "synthetic", "--init", str(path), "--out", str(run),
             "--synthetic-users", "20", "--synthetic-items", "20", "--max-items", "6", "--max-steps", "1",
             "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(train) == 0
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["model_type"] == "qwen3" and saved["architectures"] == ["Qwen3ForCausalLM"]
    lm = load_causal_lm(run / "model")
    assert type(lm) is Qwen3ForCausalLM and lm.model.layers[0].self_attn.q_norm.weight.shape == (8,)
    evaluate = ["eval", "--model", str(run), "--data", "synthetic", "--out", str(tmp_path / "ev.json"),
                "--limit", "2", "--no-progress"]
    assert main(evaluate) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["config"]["plan"] == "pft-i"
