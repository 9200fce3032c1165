"""Configuration of one training stage on the packed path (``patchrec.train.loop``), with named presets.

The released settings (docs/method.md §3): one epoch per stage, full fine-tuning, AdamW, cosine schedule with
warmup ratio 0.05, gradient clipping at 0.3, bf16, global batch 64 (MovieLens) / 32 (Goodreads) samples.
An optimizer step is ``batch_size`` samples, the same for every plan (a pre-training or dropout sample brings
its two views); they are packed into token-budget micro-batches of at most ``max_rows`` rows whose gradients
are accumulated, so ``max_rows`` only trades memory for speed and never changes what is computed.
Parameters and optimizer state are fp32 (master weights) whatever the checkpoint's dtype; ``dtype`` only
sets the compute (bf16 autocast on CUDA). ``lora_r`` > 0 trains LoRA adapters (peft) instead of every weight.

Under ``torchrun`` a step is still ``batch_size`` samples in total, split over the ranks by packed rows
(``patchrec.train.distributed``), so the global batch, the losses and the schedule do not depend on the world
size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchrec.batching.plan import check_persrec_options

STAGES = ("pretrain", "pft-i", "pft-s", "vanilla", "dropout", "persrec")
# persrec_* field -> its flag and default (the fields only apply to stage persrec)
PERSREC_FIELDS = {
    "persrec_tokens": ("--persrec-tokens", 4), "persrec_segment": ("--persrec-segment", 20),
    "persrec_old": ("--persrec-old", "item"), "persrec_layout": ("--persrec-layout", "segments"),
    "persrec_window": ("--persrec-window", 0), "persrec_recent": ("--persrec-recent", 0),
    "persrec_unroll": ("--persrec-unroll", 0),
}  # fmt: skip
DTYPES = ("auto", "bf16", "fp32")
TRAIN_EMBEDDINGS = ("none", "new", "all")  # patchrec.model.lora's choices
SAVES = ("merged", "adapter")
# LoRA-only fields -> their flags (they must keep their defaults when lora_r is 0)
LORA_FIELDS = {"lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
               "train_embeddings": "--train-embeddings"}
SAVE_DTYPES = ("fp32", "bf16")
PARALLEL = ("auto", "ddp", "fsdp")
# AdamW implementations (``patchrec.train.parallel.make_adamw``): foreach gives bitwise the result of torch's
# per-tensor loop (its CPU default) in fewer passes over the weights; fused runs one kernel per tensor
# (several times faster on CPU for a large embedding table) and rounds differently (about 1 ulp per step).
ADAMW_IMPLS = ("foreach", "fused")


@dataclass
class TrainConfig:
    # ---- what to train -----------------------------------------------------------------------------------
    stage: str = "pft-i"  # plan: pretrain | pft-i | pft-s | vanilla (plain SFT) | dropout | persrec
    k: int = 5  # pft-i: newest items kept as text (paper: 5)
    g: int = 5  # pft-s: session size (paper: 5 for ML-1M / Goodreads, 20 for ML-100K)
    p: float | None = None  # pretrain / dropout probability; None = the linear curriculum 0 -> 1
    persrec_tokens: int = 4  # persrec: personalization tokens T after each old segment (new embedding rows)
    persrec_segment: int = 20  # persrec: items per old-history segment (the last 1..N items stay recent text)
    persrec_old: str = "item"  # persrec: old items inside segments as item patches (item) or as text (text)
    persrec_layout: str = "segments"  # persrec: segments | window (the paper's) | rolling (bounded state)
    persrec_window: int = 0  # persrec window layout: P old items compressed into the tokens
    persrec_recent: int = 0  # persrec window layout: R newest items as text (reads P + R = max_items)
    persrec_unroll: int = 0  # persrec rolling layout: cut the memory's gradient every U segments (0: never)
    init: str = "tiny"  # model preset (random init), HF model / checkpoint / run directory, or a .gguf file
    # ---- LoRA (peft; patchrec[peft]) ---------------------------------------------------------------------
    lora_r: int = 0  # LoRA rank on the decoder's linear layers (0 = full fine-tuning)
    lora_alpha: float | None = None  # LoRA scale: updates are (alpha / r) B A; None = 2 r
    lora_targets: list[str] | None = None  # module names that get adapters; None = every q/k/v/o/MLP proj
    train_embeddings: str | None = None  # LoRA: none | new (markers + PerSRec rows) | all; None = new
    save: str = "merged"  # LoRA: the final model/ merged into plain weights, or the adapter (+ base path)
    # ---- data --------------------------------------------------------------------------------------------
    data: str = "synthetic"  # release directory, or "synthetic" (patchrec.data.synthetic)
    synthetic_users: int = 1000  # --data synthetic: users
    synthetic_items: int = 200  # --data synthetic: catalog size
    synthetic_length: float = 40.0  # --data synthetic: mean items per user
    synthetic_topics: int = 10  # --data synthetic: topic clusters (what a model can learn beyond popularity)
    synthetic_interests: int = 3  # --data synthetic: long-lived topics per user
    synthetic_long_term_share: float = 0.6  # --data synthetic: share of items from the long-lived topics
    synthetic_seed: int = 0  # --data synthetic: generator seed (independent of the training seed)
    tokenizer: str | None = None  # HF tokenizer dir / .gguf; None: the init's, or a BPE trained on the titles
    tokenizer_vocab: int = 1000  # vocabulary of the BPE trained on the titles when no tokenizer is given
    max_items: int = 100  # history length L (docs/method.md §4)
    train_samples: int = 0  # use a seeded random subset of this many training samples (0 = all)
    out: str = "runs/train"  # output directory (model/, checkpoints/, log.jsonl, train_config.json)
    # ---- optimisation ------------------------------------------------------------------------------------
    lr: float = 1e-5  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.05  # share of the steps with linear warmup before the cosine decay
    grad_clip: float = 0.3  # max global gradient norm (0 = no clipping)
    adamw: str = "foreach"  # AdamW implementation: foreach (= torch's per-tensor loop, bitwise) | fused
    epochs: int = 1  # passes over the training samples (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs (the schedule is laid out over these)
    batch_size: int = 64  # samples per optimizer step (docs/method.md §3: 64 MovieLens, 32 Goodreads)
    max_rows: int = 8192  # token budget: packed rows per micro-batch (a sample never straddles two)
    seed: int = 0  # weights (preset init), data order, random plans
    # ---- validation, logging, checkpoints ----------------------------------------------------------------
    # steps between validations (0 = never; also skipped if patchrec.eval.evaluate is absent)
    val_every: int = 0
    val_samples: int = 256  # seeded random subset of the validation split used for HR/NDCG
    val_plan: str | None = None  # plan for validation; None = the stage's, or pft-i for pretrain / dropout
    log_every: int = 10  # steps between log.jsonl lines (the progress bar updates every step)
    save_every: int = 0  # steps between checkpoints (0 = only the final model)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (older ones are deleted after a save)
    halt_after: int = 0  # stop (with a checkpoint) after this step without changing the schedule (0 = never)
    # ---- hardware ----------------------------------------------------------------------------------------
    dtype: str = "auto"  # autocast: auto = bf16 on CUDA and fp32 on CPU; bf16 (CUDA only); fp32
    device: str = "auto"  # auto = cuda when available, else cpu
    save_dtype: str = "fp32"  # dtype of the final saved model (checkpoints stay fp32 for exact resume)
    progress: bool = True  # tqdm progress bar (rank 0 only under torchrun)
    # ---- several processes (torchrun; a single process ignores these) -----------------------------------
    parallel: str = "auto"  # auto = ddp (DistributedDataParallel) | fsdp (FSDP2: sharded weights/grads/AdamW)
    dist_timeout: float = 1800.0  # seconds any collective may wait: a dead or stuck rank fails the job

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.val_plan is not None and self.val_plan not in ("vanilla", "pft-i", "pft-s"):
            raise ValueError(f"val_plan must be vanilla, pft-i or pft-s, got {self.val_plan!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        if self.adamw not in ADAMW_IMPLS:
            raise ValueError(f"adamw must be one of {ADAMW_IMPLS}, got {self.adamw!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        check_persrec_options(self.persrec_segment, self.persrec_tokens, self.persrec_old,
                              self.persrec_layout, self.persrec_window, self.persrec_recent,
                              self.persrec_unroll)  # fmt: skip
        window = self.persrec_window + self.persrec_recent
        if self.persrec_layout == "window" and self.max_items != window:
            raise ValueError(f"--persrec-layout window reads P + R = {window} items: --max-items must be "
                             f"that, got {self.max_items}")  # fmt: skip
        self._validate_lora()
        if self.stage != "persrec":
            for name, (flag, default) in PERSREC_FIELDS.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{flag} is only for --stage persrec (stage is {self.stage!r})")
        positive = ("lr", "batch_size", "max_rows", "max_items", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("weight_decay", "grad_clip", "epochs", "max_steps", "val_every", "val_samples",
                        "log_every", "save_every", "halt_after", "train_samples")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("set epochs > 0 or max_steps > 0")

    def _validate_lora(self) -> None:
        if self.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0, got {self.lora_r}")
        if self.save not in SAVES:
            raise ValueError(f"--save must be one of {SAVES}, got {self.save!r}")
        if not self.lora_r:
            for name, flag in LORA_FIELDS.items():
                if getattr(self, name) is not None:
                    raise ValueError(f"{flag} is only for LoRA (--lora-r > 0)")
            if self.save != "merged":
                raise ValueError("--save adapter is only for LoRA (--lora-r > 0)")
            return
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lora_targets is not None and not self.lora_targets:
            raise ValueError("--lora-targets must name at least one module")
        if self.train_embeddings is not None and self.train_embeddings not in TRAIN_EMBEDDINGS:
            choices = TRAIN_EMBEDDINGS
            raise ValueError(f"--train-embeddings must be one of {choices}, got {self.train_embeddings!r}")
        if self.parallel == "fsdp":
            raise ValueError("--lora-r with --parallel fsdp is not supported: use ddp (the default)")

    # ---- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such train config")
        return cls.from_dict(json.loads(path.read_text()))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Released settings (docs/method.md §3): the global batch in samples; max_rows is only the micro-batch budget.
PRESETS: dict[str, dict[str, Any]] = {
    "ml-100k": dict(lr=1e-5, g=20, weight_decay=0.0, warmup_ratio=0.05, grad_clip=0.3, epochs=1,
                    batch_size=64, max_rows=16384),
    # The release lowers the learning rate for ML-100K PFT-S.
    "ml-100k-pft-s": dict(lr=3e-6, stage="pft-s", g=20, weight_decay=0.0, warmup_ratio=0.05, grad_clip=0.3,
                          epochs=1, batch_size=64, max_rows=16384),
    "ml-1m": dict(lr=8e-6, g=5, weight_decay=0.0, warmup_ratio=0.05, grad_clip=0.3, epochs=1,
                  batch_size=64, max_rows=16384),
    "goodreads": dict(lr=5e-5, g=5, weight_decay=0.0, warmup_ratio=0.05, grad_clip=0.3, epochs=1,
                      batch_size=32, max_rows=16384),
    # CPU, random init (model preset "tiny"): a high learning rate because nothing is pre-trained, looser
    # clipping because early gradients of a random model are large, a small token budget for 2 cores.
    "tiny": dict(init="tiny", lr=2e-3, weight_decay=0.01, warmup_ratio=0.05, grad_clip=1.0, epochs=1,
                 batch_size=32, max_rows=4096, log_every=5),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from a named preset (``PRESETS``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return TrainConfig(**(PRESETS[name] | overrides))
