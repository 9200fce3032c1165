"""Where a decoder comes from: a Hugging Face model directory (``config.json`` + safetensors) or a single
``.gguf`` file (llama.cpp's format, e.g. SmolLM2-135M-Instruct), both read offline, and which decoder
families patchrec runs exactly (``SUPPORTED_ARCHITECTURES``).

A checkpoint loads as its own family's transformers class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...),
never as another family's: an unsupported ``model_type`` is a ``ValueError`` naming it and the supported
ones, and a supported family whose config asks for an attention feature the packed attention does not
implement (``unsupported_features``: Gemma 2's attention-logit soft-capping, bidirectional attention) is
refused naming that feature. Sliding-window layers (Mistral, Gemma, Qwen2 with ``use_sliding_window``) run
exactly as long as no sequence reaches past the window; a longer one is refused at the call
(``patchrec.model.attention``).

GGUF files load through transformers' own GGUF reader (the ``gguf`` package; weights are dequantised to the
requested dtype). A model read that way carries a ``quantization_config`` and refuses ``save_pretrained``, so
its weights are copied into a plain model of the same class and config: from then on it is an ordinary model
that saves as safetensors and reloads in plain transformers. The tokenizer and its chat template come from
the same file (``patchrec.batching.hf_files.load_hf_tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from patchrec.batching.hf_files import check_json_files, is_gguf, read_gguf

# The decoder families patchrec runs exactly (model_type -> the transformers class it loads as). Their layers
# run unchanged; only the attention function is patchrec's. Anything else is refused: loading it into another
# family's class would drop weights silently (Qwen2's q/k/v biases, Qwen3's q/k norms).
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Llama 2/3.x, SmolLM2
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5 (q/k/v biases)
    "qwen3": "Qwen3ForCausalLM",  # q/k RMSNorms
    "gemma2": "Gemma2ForCausalLM",  # only without attention soft-capping (real Gemma 2 checkpoints have it)
    "gemma3_text": "Gemma3ForCausalLM",  # Gemma 3 text (1B; q/k norms, scaled embeddings, local/global RoPE)
}


# ---- files that do not read: one ValueError naming the file, not a library's traceback -------------------
def check_weight_files(directory: Path) -> None:
    """``FileNotFoundError`` when a model directory has no safetensors weights, ``ValueError`` naming a
    weights file whose header or length is wrong (safetensors checks both when the file is opened, without
    reading the tensors)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        weights = directory / "model.safetensors"
        raise FileNotFoundError(f"{weights}: no such file (no *.safetensors weights in {directory})")
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") \
                from None


def unsupported_features(config: PretrainedConfig) -> list[str]:
    """Attention features of a supported family's config that the packed attention does not implement."""
    found = []
    if getattr(config, "attn_logit_softcapping", None) is not None:
        found.append(f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping})")
    if getattr(config, "use_bidirectional_attention", False):
        found.append("bidirectional attention (use_bidirectional_attention=True)")
    return found


def _check_family(model_type, architectures, source: str | Path) -> str:
    """The class name a supported ``model_type`` loads as; ``ValueError`` naming it and the supported ones."""
    architectures = list(architectures or [])
    expected = SUPPORTED_ARCHITECTURES.get(model_type)
    if expected is None or any(a != expected for a in architectures):
        found = ", ".join(architectures) or "no architectures listed"
        supported = ", ".join(f"{t} ({c})" for t, c in SUPPORTED_ARCHITECTURES.items())
        raise ValueError(
            f"{source}: architecture {found} (model_type {model_type!r}) is not supported; "
            f"supported: {supported}"
        )
    return expected


def check_architecture(config: PretrainedConfig, source: str | Path) -> None:
    """``ValueError`` unless ``config`` describes a supported decoder family (``SUPPORTED_ARCHITECTURES``)
    without an unsupported attention feature (``unsupported_features``)."""
    model_type, architectures = getattr(config, "model_type", None), getattr(config, "architectures", None)
    expected = _check_family(model_type, architectures, source)
    features = unsupported_features(config)
    if features:
        raise ValueError(f"{source}: {expected} uses {'; '.join(features)}: not implemented by patchrec")


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class of a supported config's family (``check_architecture`` first)."""
    check_architecture(config, "config")
    return getattr(transformers, SUPPORTED_ARCHITECTURES[config.model_type])


def read_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of an HF directory or a ``.gguf`` file, read offline."""
    if is_gguf(path):
        return read_gguf(path, lambda folder, name: AutoConfig.from_pretrained(
            folder, gguf_file=name, local_files_only=True))
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: not a Hugging Face model directory or a .gguf file")
    check_json_files(path)
    # The family first, from the raw file: transformers cannot even parse a model_type it does not know.
    raw = json.loads((path / "config.json").read_text())
    _check_family(raw.get("model_type"), raw.get("architectures"), path)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_causal_lm(
    path: str | Path, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The family's own ``*ForCausalLM`` from an HF directory or a ``.gguf`` file (``dtype`` None: the
    checkpoint's own dtype for a directory, fp32 for GGUF)."""
    config = read_config(path)
    check_architecture(config, path)
    model_class = causal_lm_class(config)
    if is_gguf(path):
        from transformers import AutoModelForCausalLM

        read = read_gguf(path, lambda folder, name: AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype or torch.float32, local_files_only=True))
        if type(read) is not model_class:
            raise ValueError(f"{path}: read as a {type(read).__name__}, expected {model_class.__name__}")
        config = read.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a plain model: saves as safetensors, reloads without gguf
        plain = model_class(config)
        plain.load_state_dict(read.state_dict())
        plain.to(read.dtype)
        if attn_implementation is not None:
            plain.set_attn_implementation(attn_implementation)
        return plain
    check_weight_files(Path(path))
    return model_class.from_pretrained(path, dtype=dtype, local_files_only=True,
                                       attn_implementation=attn_implementation)
