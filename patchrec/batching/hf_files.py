"""Hugging Face files read offline, below the model layer: a ``.gguf`` path (llama.cpp's single-file format,
e.g. SmolLM2-135M-Instruct: weights, tokenizer and chat template in one file), the tokenizer of an HF
directory or a ``.gguf`` file, and files that do not read reported as one error naming the file. The model
side (configs, weights, families) is ``patchrec.model.backbone``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

GGUF_SUFFIX = ".gguf"
# The JSON files of a model or tokenizer directory that transformers reads (when present).
JSON_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
T = TypeVar("T")


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def gguf_parts(path: str | Path) -> tuple[str, str]:
    """(directory, file name) as transformers' ``gguf_file`` loading wants them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return str(path.parent), path.name


# ---- files that do not read: one ValueError naming the file, not a library's traceback -------------------
def check_json_files(directory: Path) -> None:
    """``ValueError`` naming the first of ``JSON_FILES`` in ``directory`` that is not valid UTF-8 JSON (a
    truncated or corrupted write); transformers' own errors name no file or only a directory."""
    for name in JSON_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text (corrupted?)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: malformed JSON (truncated or corrupted?): {exc.msg} (line "
                             f"{exc.lineno}, column {exc.colno})") from None


def read_gguf(path: str | Path, read: Callable[[str, str], T]) -> T:
    """``read(folder, name)`` on a ``.gguf`` file; any failure of the GGUF reader on the file's bytes (it
    raises struct.error, ValueError, IndexError, ... deep inside) is one ``ValueError`` naming the file."""
    folder, name = gguf_parts(path)
    try:
        return read(folder, name)
    except ImportError:
        raise  # a missing package (gguf, or one it needs): the environment's problem, not the file's
    except Exception as exc:  # noqa: BLE001 - many error types, all meaning "this file does not read"
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot read this GGUF file ({type(exc).__name__}: {first})") from exc


def load_hf_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of a directory or of a ``.gguf`` file (its chat template included)."""
    from transformers import AutoTokenizer  # transformers' tokenizer stack: only when a tokenizer is read

    if is_gguf(path):
        return read_gguf(path, lambda folder, name: AutoTokenizer.from_pretrained(
            folder, gguf_file=name, local_files_only=True))
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    check_json_files(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # valid JSON that the tokenizers library cannot build a tokenizer from
        if isinstance(exc, (ValueError, FileNotFoundError)):
            raise
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable tokenizer ({type(exc).__name__}: {first})") from exc


def has_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` carries a tokenizer: a GGUF file always does, a directory when it has the files."""
    path = Path(path)
    if is_gguf(path):
        return path.is_file()
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
