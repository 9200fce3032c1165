"""LoRA on the packed decoder through ``peft`` (the optional extra ``patchrec[peft]``), and loading a model
that may be an adapter.

``apply_lora`` injects LoRA adapters into the decoder's linear layers (peft's ``inject_adapter_in_model``;
the default targets are every attention and MLP projection, named alike in every supported family) and
freezes everything else. The input-embedding table (the output head too when it is tied to it) is
``none``: frozen; ``new``: trainable at the rows patchrec adds only, the history markers and PerSRec tokens
(a gradient mask on the table, which is then also kept out of weight decay, so every other row stays exactly
as loaded; AdamW still holds state for the whole table); ``all``: trainable. Item and session patches are
taken over that table whether it is frozen or not: ``patch_embed`` reads it exactly as in full fine-tuning.

An adapter directory (a LoRA run's checkpoints, its final ``model/`` with ``--save adapter``) holds

    adapter_config.json, adapter_model.safetensors   peft's files: the LoRA weights
    embeddings.safetensors   the embedding rows that are not the base checkpoint's: the rows added to its
                             vocabulary and the trained rows (the whole table for ``all``), and the output
                             head's added rows when it is not tied
    patchrec_adapter.json    the base (a model path, itself possibly an adapter directory, or a preset and
                             seed), the vocabulary sizes and the LoRA settings

``load_model`` reads a plain model directory or an adapter directory (the base first, then the adapter);
``merge_lora`` folds the adapters into plain weights (``--save merged``; evaluation merges too).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from patchrec.model.decoder import PackedDecoder

TRAIN_EMBEDDINGS = ("none", "new", "all")
# The linear layers of a decoder block: the same module names in Llama, Qwen2/3, Mistral and Gemma.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "patchrec_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    r: int  # rank of every adapter
    alpha: float  # the update is (alpha / r) * B @ A
    targets: tuple[str, ...] = DEFAULT_TARGETS  # names of the linear modules that get an adapter
    train_embeddings: str = "new"  # none | new (rows patchrec adds) | all

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("--lora-targets must name at least one module")
        if self.train_embeddings not in TRAIN_EMBEDDINGS:
            raise ValueError(
                f"--train-embeddings must be one of {TRAIN_EMBEDDINGS}, got {self.train_embeddings!r}"
            )


def _peft():
    try:
        import peft
    except ImportError as err:  # an optional extra
        raise ValueError("LoRA needs the peft package: pip install 'patchrec[peft]'") from err
    return peft


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


class LoraAdapter:
    """What ``apply_lora`` attached to a ``PackedDecoder`` (``model.adapter``): settings, base, saving."""

    def __init__(self, model: PackedDecoder, settings: LoraSettings, base: dict, new_rows: Sequence[int]):
        self.settings = settings
        self.base = dict(base)  # {"path": str} or {"preset": str, "seed": int}
        self.new_rows = sorted({int(r) for r in new_rows})
        self.vocab_size = model.embedding_table().shape[0]
        self.base_vocab_size = model.base_vocab_size
        self.peft_config = _peft().LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, target_modules=list(settings.targets), lora_dropout=0.0,
            bias="none", base_model_name_or_path=self.base.get("path"),
        )  # fmt: skip

    def saved_rows(self) -> torch.Tensor:
        """Input-table rows an adapter directory stores (everything for ``all``)."""
        if self.settings.train_embeddings == "all":
            return torch.arange(self.vocab_size)
        added = set(range(self.base_vocab_size, self.vocab_size))
        trained = set(self.new_rows) if self.settings.train_embeddings == "new" else set()
        return torch.tensor(sorted(added | trained), dtype=torch.long)

    def no_weight_decay(self, model: PackedDecoder) -> set[str]:
        """Parameter names kept out of weight decay: the table whose rows are masked (``new``)."""
        if self.settings.train_embeddings != "new":
            return set()
        table = model.embedding_table()
        return {name for name, p in model.named_parameters() if p is table}

    def save(self, model: PackedDecoder, path: str | Path, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()

        # The embedding rows are saved below (only those that differ from the base), never by peft.
        weights = _peft().get_peft_model_state_dict(model.lm, save_embedding_layers=False)
        save_file({k: cast(v) for k, v in weights.items()}, str(path / WEIGHTS_FILE))
        self.peft_config.save_pretrained(str(path))
        rows = self.saved_rows()
        table = model.embedding_table()
        embeddings = {"input_rows": rows, "input": cast(table.index_select(0, rows.to(table.device)))}
        head = model.lm.get_output_embeddings().weight
        if head is not table:  # an untied head: its added rows were initialised on resize, keep them
            out_rows = torch.arange(self.base_vocab_size, self.vocab_size)
            out = cast(head.index_select(0, out_rows.to(head.device)))
            embeddings |= {"output_rows": out_rows, "output": out}
        save_file(embeddings, str(path / EMBEDDINGS_FILE))
        record = {"format": 1, "base": self.base, "vocab_size": self.vocab_size,
                  "base_vocab_size": self.base_vocab_size, "new_rows": self.new_rows,
                  "lora": asdict(self.settings)}  # fmt: skip
        (path / ADAPTER_FILE).write_text(json.dumps(record, indent=1) + "\n")


def apply_lora(model: PackedDecoder, settings: LoraSettings, *, base: dict, new_rows: Sequence[int]):
    """Inject LoRA into ``model`` (in place) and set what trains (see the module docstring); returns it.

    ``base`` records where the frozen weights come from (``{"path": ...}`` or ``{"preset": ..., "seed":
    ...}``) for adapter directories; ``new_rows`` are the token ids patchrec added (markers, PerSRec tokens).
    """
    if getattr(model, "adapter", None) is not None:
        raise ValueError("model already has LoRA adapters: merge_lora it first")
    adapter = LoraAdapter(model, settings, base, new_rows)
    table = model.embedding_table()
    if any(r < 0 or r >= table.shape[0] for r in adapter.new_rows):
        raise ValueError(f"new_rows must be token ids in [0, {table.shape[0]})")
    _peft().inject_adapter_in_model(adapter.peft_config, model.lm)  # freezes every other parameter
    if settings.train_embeddings != "none":
        table.requires_grad_(True)
    if settings.train_embeddings == "new":
        keep = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
        keep[adapter.new_rows] = 1
        # Before accumulation (and so before DDP's all-reduce): the other rows never see a gradient.
        table.register_hook(lambda grad: grad * keep.to(grad.dtype))
    model.adapter = adapter
    return model


def merge_lora(model: PackedDecoder) -> PackedDecoder:
    """A plain copy of ``model`` with every adapter folded into its layer's weight (W + alpha/r * B @ A)."""
    tuner_layer = _peft().tuners.tuners_utils.BaseTunerLayer
    lm = copy.deepcopy(model.lm)
    tuned = [(name, m) for name, m in lm.named_modules() if isinstance(m, tuner_layer)]
    for name, module in tuned:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent), child, module.get_base_layer())
    if hasattr(lm, "peft_config"):
        del lm.peft_config
    lm.requires_grad_(True)
    merged = PackedDecoder(lm)
    merged.base_vocab_size = model.base_vocab_size
    return merged


def load_model(
    path: str | Path, *, vocab_size: int | None = None, dtype: torch.dtype | None = None, merge: bool = False
) -> PackedDecoder:
    """A plain model directory / ``.gguf`` file (``PackedDecoder.from_pretrained``) or an adapter directory:
    its base rebuilt (recursively: a base may be an adapter directory), the adapter and the saved embedding
    rows loaded on top; ``merge`` returns ``merge_lora`` of it."""
    if not is_adapter_dir(path):
        return PackedDecoder.from_pretrained(path, vocab_size=vocab_size, dtype=dtype)
    from safetensors.torch import load_file

    path = Path(path)
    record = json.loads((path / ADAPTER_FILE).read_text())
    size = int(record["vocab_size"])
    if vocab_size is not None and vocab_size > size:
        raise ValueError(f"{path}: the adapter was trained with {size} embedding rows, not {vocab_size}")
    base = record["base"]
    if "preset" in base:
        model = PackedDecoder.from_preset(base["preset"], size, seed=int(base["seed"]))
        model = model.to(dtype) if dtype is not None else model
    else:
        model = load_model(base["path"], vocab_size=size, dtype=dtype, merge=True)
    model.base_vocab_size = int(record["base_vocab_size"])
    lora = record["lora"]
    settings = LoraSettings(int(lora["r"]), float(lora["alpha"]), tuple(lora["targets"]),
                            lora["train_embeddings"])  # fmt: skip
    apply_lora(model, settings, base=base, new_rows=record["new_rows"])
    loaded = _peft().set_peft_model_state_dict(model.lm, load_file(str(path / WEIGHTS_FILE)))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{path}: adapter weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {loaded.unexpected_keys[:3]})")  # fmt: skip
    rows = load_file(str(path / EMBEDDINGS_FILE))
    with torch.no_grad():
        table = model.embedding_table()
        table[rows["input_rows"].to(table.device)] = rows["input"].to(table)
        if "output_rows" in rows:
            head = model.lm.get_output_embeddings().weight
            head[rows["output_rows"].to(head.device)] = rows["output"].to(head)
    return merge_lora(model) if merge else model


__all__ = ["DEFAULT_TARGETS", "TRAIN_EMBEDDINGS", "LoraAdapter", "LoraSettings", "apply_lora",
           "is_adapter_dir", "load_model", "merge_lora"]
