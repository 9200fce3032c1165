"""What ``patchrec reproduce`` runs: scales, the dataset's released settings (``--preset``), and the paper's
experiments as training stages and evaluated rows.

Released settings. A dataset's hyper-parameters (learning rate, G, batch) come from ``--preset``; without it
they are inferred from the data itself: a release whose users, catalog size and interaction count are those
of one of the released datasets (``RELEASES``) gets that dataset's settings, whatever its folder is called.
Anything else is a ``ValueError`` naming the presets: there is no default dataset.

Experiments (``EXPERIMENTS``); every row is one model evaluated with one plan:

- ``table2``: zero-shot backbone, vanilla SFT, patch pre-training -> PFT-I (K) and -> PFT-S (G), and the ID
  baselines (popularity, SASRec, GRU4Rec);
- ``table3``: PFT-I and PFT-S trained from the backbone without patch pre-training;
- ``table4``: the patch pre-training stage alone, evaluated under PFT-I and PFT-S compression;
- ``dropout``: the dropout ablation as a first stage instead of patch pre-training (the chosen items are
  deleted instead of compressed), alone under PFT-I and followed by PFT-I;
- ``long``: PFT-I and PFT-S with K = G = ``long_k`` at the longer history lengths ``long_lengths``
  (0 = a user's whole history), fine-tuned from the shared patch pre-training stage, plus the cost curve
  (history tokens and LLM positions per test sample against L, vanilla included).
"""

from __future__ import annotations

from dataclasses import dataclass

from patchrec.data.dataset import Dataset
from patchrec.train.config import PRESETS as TRAIN_PRESETS


@dataclass(frozen=True)
class Scale:
    """How much of the paper's protocol a run affords."""

    max_items: int  # history length L
    batch_size: int  # samples per optimizer step, every stage (0 = the dataset's released batch)
    train_samples: int  # seeded subset of the training split per stage (0 = all: one epoch)
    test_samples: int  # seeded subset of the test split (0 = all)
    lr: float | None  # peak learning rate of every stage (None: the dataset's released rates)
    k: int  # PFT-I: newest items as text
    g: int | None  # PFT-S session size (None: the dataset's released G)
    exact: bool  # also rank the whole catalog exactly (cost: every title scored per sample)
    max_rows: int  # micro-batch budget (memory only)
    baseline_minutes: float  # training budget of each neural ID baseline (0 = until early stopping)
    why: str  # what the scale is for
    baseline_epochs: int = 200  # upper bound of the ID baselines' epochs (early stopping usually ends sooner)
    long_lengths: tuple[int, ...] = (150, 350, 0)  # experiment long: history lengths L (0 = all)
    long_k: int = 20  # experiment long: K of PFT-I and G of PFT-S


SCALES: dict[str, Scale] = {
    "paper": Scale(max_items=100, batch_size=0, train_samples=0, test_samples=0, lr=None, k=5, g=None,
                   exact=True, max_rows=16384, baseline_minutes=0.0,
                   why="the released settings: L=100, the released batch, one epoch per stage, the released "
                       "learning rates and G, every test sample, exact ranking too; long: K=G=20 at "
                       "L=150/350/all; a GPU job"),
    # 2-core CPU, SmolLM2-135M (~120 packed rows/s training, ~1 s per sample of beam search at L=20).
    "cpu": Scale(max_items=20, batch_size=16, train_samples=480, test_samples=200, lr=1e-4, k=5, g=5,
                 exact=False, max_rows=4096, baseline_minutes=4.0,
                 why="a subset that finishes in about an hour on a 2-core CPU: L=20 (rows per sample ~5x "
                     "fewer than L=100), 30 steps of 16 samples per stage, G=5 (G=20 would leave an L=20 "
                     "history all text), lr 1e-4 (30 steps at the released 1e-5 barely move the weights), "
                     "200 seeded test samples, beam only (exact ranking scores 1,682 titles per sample: "
                     "~30 s each here); long: K=G=5 at L=40/80/all",
                 long_lengths=(40, 80, 0), long_k=5),
}

# ---- released settings --------------------------------------------------------------------------------
# The released datasets as their own data describes them: (users, catalog items, interactions).
RELEASES: dict[str, tuple[int, int, int]] = {
    "ml-100k": (682, 1682, 51824),
    "ml-1m": (6038, 3883, 575281),
    "goodreads": (2090, 8793, 162539),
}
HYPER_FIELDS = ("lr", "g", "batch_size", "weight_decay", "warmup_ratio", "grad_clip")


def fingerprint(dataset: Dataset) -> tuple[int, int, int]:
    return (dataset.num_users, dataset.num_items, len(dataset.items))


def infer_preset(dataset: Dataset) -> str | None:
    """The released dataset whose users, catalog and interactions ``dataset`` has, else None."""
    return next((name for name, fp in RELEASES.items() if fp == fingerprint(dataset)), None)


def resolve_preset(dataset: Dataset, preset: str | None, where: str) -> tuple[str, str]:
    """(preset, how it was chosen): ``preset`` when given (checked), else inferred from the data; a
    ``ValueError`` naming the choices when neither works (``where``: the data argument, for the message)."""
    if preset is not None:
        if preset not in RELEASES:
            raise ValueError(f"--preset must be one of {sorted(RELEASES)}, got {preset!r}")
        return preset, "--preset"
    inferred = infer_preset(dataset)
    if inferred is None:
        users, items, events = fingerprint(dataset)
        known = ", ".join(f"{n}: {u:,}/{i:,}/{e:,}" for n, (u, i, e) in RELEASES.items())
        raise ValueError(
            f"--data {where}: {users:,} users, {items:,} items, {events:,} interactions is none of the "
            f"released datasets (users/items/interactions {known}); pass --preset one of {sorted(RELEASES)} "
            "to choose whose released settings to use"
        )
    return inferred, "inferred from the data (users, items, interactions)"


def released(preset: str, stage: str) -> dict:
    """The released hyper-parameters of a dataset for one training plan (``patchrec.train.config.PRESETS``;
    ML-100K's PFT-S has its own learning rate)."""
    if preset not in RELEASES:
        raise ValueError(f"preset must be one of {sorted(RELEASES)}, got {preset!r}")
    key = "ml-100k-pft-s" if (preset, stage) == ("ml-100k", "pft-s") else preset
    return {name: TRAIN_PRESETS[key][name] for name in HYPER_FIELDS}


# ---- experiments ---------------------------------------------------------------------------------------
EXPERIMENTS = ("table2", "table3", "table4", "dropout", "long")
BASELINES = ("popularity", "sasrec", "gru4rec")


@dataclass(frozen=True)
class StageSpec:
    """One training stage: ``plan`` trained from ``init`` (another stage's name, or None: the backbone)."""

    name: str  # directory under stages/
    plan: str  # TrainConfig.stage: vanilla | pretrain | pft-i | pft-s | dropout
    init: str | None
    max_items: int  # history length L (0 = all)
    k: int
    g: int


@dataclass(frozen=True)
class RowSpec:
    """One evaluated row: the model of ``stage`` (None: the backbone) ranked with ``plan``."""

    name: str  # file name under eval/
    label: str  # what the summary calls it
    experiment: str
    stage: str | None
    plan: str  # vanilla | pft-i | pft-s
    max_items: int  # 0 = all
    k: int
    g: int


def parse_experiments(text: str) -> tuple[str, ...]:
    """``"table2,long"`` -> ("table2", "long") in ``EXPERIMENTS`` order; ``"all"`` = every experiment."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return EXPERIMENTS
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise ValueError(f"--experiments must be 'all' or a comma list of {list(EXPERIMENTS)}, got {text!r}")
    return tuple(e for e in EXPERIMENTS if e in names)


def length_name(max_items: int) -> str:
    return "all" if max_items == 0 else str(max_items)


def experiment_rows(experiments: tuple[str, ...], scale: Scale, g: int) -> list[RowSpec]:
    """The LLM rows of ``experiments`` in summary order (``g``: the run's PFT-S session size)."""
    L, k, lk = scale.max_items, scale.k, scale.long_k
    rows = {
        "table2": [RowSpec("zero-shot", "zero-shot backbone", "table2", None, "vanilla", L, k, g),
                   RowSpec("vanilla", "vanilla SFT", "table2", "vanilla", "vanilla", L, k, g),
                   RowSpec("pft-i", f"pre-training -> PFT-I (K={k})", "table2", "pft-i", "pft-i", L, k, g),
                   RowSpec("pft-s", f"pre-training -> PFT-S (G={g})", "table2", "pft-s", "pft-s", L, k, g)],
        "table3": [RowSpec("pft-i-no-pt", f"PFT-I (K={k}), no pre-training", "table3", "pft-i-no-pt", "pft-i",
                           L, k, g),
                   RowSpec("pft-s-no-pt", f"PFT-S (G={g}), no pre-training", "table3", "pft-s-no-pt", "pft-s",
                           L, k, g)],
        "table4": [RowSpec("pretrain-only-pft-i", f"pre-training only, PFT-I eval (K={k})", "table4",
                           "pretrain", "pft-i", L, k, g),
                   RowSpec("pretrain-only-pft-s", f"pre-training only, PFT-S eval (G={g})", "table4",
                           "pretrain", "pft-s", L, k, g)],
        "dropout": [RowSpec("dropout-only-pft-i", f"dropout only, PFT-I eval (K={k})", "dropout", "dropout",
                            "pft-i", L, k, g),
                    RowSpec("dropout-pft-i", f"dropout -> PFT-I (K={k})", "dropout", "dropout-pft-i",
                            "pft-i", L, k, g)],
        "long": [RowSpec(f"long-{plan}-L{length_name(n)}", f"pre-training -> {plan.upper()} "
                         f"({'K' if plan == 'pft-i' else 'G'}={lk}), L={length_name(n)}", "long",
                         f"long-{plan}-L{length_name(n)}", plan, n, lk, lk)
                 for n in scale.long_lengths for plan in ("pft-i", "pft-s")],
    }  # fmt: skip
    return [row for e in experiments for row in rows[e]]


def experiment_stages(experiments: tuple[str, ...], scale: Scale, g: int) -> list[StageSpec]:
    """Every training stage the rows of ``experiments`` need, each before the stages started from it."""
    L, k = scale.max_items, scale.k
    specs = {
        "vanilla": StageSpec("vanilla", "vanilla", None, L, k, g),
        "pretrain": StageSpec("pretrain", "pretrain", None, L, k, g),
        "pft-i": StageSpec("pft-i", "pft-i", "pretrain", L, k, g),
        "pft-s": StageSpec("pft-s", "pft-s", "pretrain", L, k, g),
        "pft-i-no-pt": StageSpec("pft-i-no-pt", "pft-i", None, L, k, g),
        "pft-s-no-pt": StageSpec("pft-s-no-pt", "pft-s", None, L, k, g),
        "dropout": StageSpec("dropout", "dropout", None, L, k, g),
        "dropout-pft-i": StageSpec("dropout-pft-i", "pft-i", "dropout", L, k, g),
    }
    for n in scale.long_lengths:
        for plan in ("pft-i", "pft-s"):
            name = f"long-{plan}-L{length_name(n)}"
            specs[name] = StageSpec(name, plan, "pretrain", n, scale.long_k, scale.long_k)
    needed: list[str] = []

    def need(name: str) -> None:
        if specs[name].init is not None:
            need(specs[name].init)
        if name not in needed:
            needed.append(name)

    for row in experiment_rows(experiments, scale, g):
        if row.stage is not None:
            need(row.stage)
    return [specs[name] for name in needed]
