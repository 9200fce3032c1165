"""Hugging Face files read offline, below the model layer: a ``.gguf`` path (llama.cpp's single-file format,
e.g. SmolLM2-135M-Instruct: weights, tokenizer and chat template in one file) and the tokenizer of an HF
directory or a ``.gguf`` file. The model side (configs, weights, families) is ``patchrec.model.backbone``."""

from __future__ import annotations

from pathlib import Path

GGUF_SUFFIX = ".gguf"


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def gguf_parts(path: str | Path) -> tuple[str, str]:
    """(directory, file name) as transformers' ``gguf_file`` loading wants them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return str(path.parent), path.name


def load_hf_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of a directory or of a ``.gguf`` file (its chat template included)."""
    from transformers import AutoTokenizer  # transformers' tokenizer stack: only when a tokenizer is read

    if is_gguf(path):
        folder, name = gguf_parts(path)
        return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def has_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` carries a tokenizer: a GGUF file always does, a directory when it has the files."""
    path = Path(path)
    if is_gguf(path):
        return path.is_file()
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
