"""The committed dry runs of ``patchrec reproduce --scale paper --experiments all`` (docs/reproduce.md's
GPU-hour estimates), without Llama-3.2-1B's weights: a dry run reads only the backbone's config and
tokenizer, so a stand-in directory holds Llama-3.2-1B's shapes
(``patchrec.model.decoder.PRESETS["llama-3.2-1b"]``), the Llama-3 tokenizer and a chat template that renders
Llama-3.2-Instruct's layout for a system + user prompt.

    python benches/reproduce_dry_runs.py --tokenizer ../shared/tokenizers/llama3 \\
        --data-root ../shared/data/patchrec --out benches/results/reproduce-dry-run

writes ``<out>/<dataset>/dry_run.json`` and ``dry_run.md`` for ml-100k, ml-1m and goodreads.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

# Llama-3.2-Instruct's prompt for a system + user conversation (its full template also handles tools).
LLAMA_32_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'system' %}Cutting Knowledge Date: December 2023\nToday Date: {{ date_string }}\n\n"
    "{% endif %}{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DATASETS = ("ml-100k", "ml-1m", "goodreads")


def stand_in(tokenizer: Path, path: Path) -> Path:
    """config.json of Llama-3.2-1B's shapes + the tokenizer with the chat template; no weights."""
    from transformers import AutoTokenizer

    from patchrec.model.decoder import llama_config

    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    tok.chat_template = LLAMA_32_CHAT
    tok.save_pretrained(str(path))
    config = llama_config("llama-3.2-1b", len(tok))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(path))
    return path


def main() -> None:
    from patchrec.cli import main as cli

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--tokenizer", required=True, help="Llama-3 tokenizer directory")
    parser.add_argument("--data-root", required=True, help="directory holding ml-100k/, ml-1m/, goodreads/")
    parser.add_argument("--out", required=True, help="results directory")
    args = parser.parse_args()
    # A fixed path, so that the committed results do not change with a random temporary name.
    root = Path(tempfile.gettempdir()) / "patchrec-llama-3.2-1b-stand-in"
    shutil.rmtree(root, ignore_errors=True)
    backbone = stand_in(Path(args.tokenizer), root / "Llama-3.2-1B-Instruct")
    try:
        for name in DATASETS:
            out = Path(args.out) / name
            shutil.rmtree(out, ignore_errors=True)
            code = cli(["reproduce", "--data", str(Path(args.data_root) / name), "--backbone", str(backbone),
                        "--out", str(out), "--scale", "paper", "--experiments", "all", "--dry-run",
                        "--no-progress"])  # fmt: skip
            if code:
                raise SystemExit(code)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
