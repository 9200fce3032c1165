"""Compression plans (docs/method.md §3): which granularity each history item gets.

A plan of a history of ``n`` items (oldest first) is two arrays of length ``n``:
- ``kinds``: ``TEXT`` (the title's tokens, one position each), ``ITEM`` (one item patch), ``SESSION``
  (member of a session patch) or ``DROP`` (deleted with its separator);
- ``group``: the index of the history piece the item belongs to, ``0..pieces-1`` oldest first, ``-1`` for
  ``DROP``. Items of one session share a group; every TEXT or ITEM item is a group of its own. Groups are
  contiguous and non-decreasing over the kept items, and pieces are separated by ``<|item_sep|>``.

``persrec_plan`` is the item-level part of PerSRec: the items that go into the state (old segments, the old
window, or the folded segments of the rolling layout: ``patchrec.batching.persrec_layouts``) as ITEM (or
TEXT), the recent items as TEXT; the packer adds the personalization-token rows, the attention blocks and,
for the rolling layout, the fold passes (``patchrec.batching.pack``).

Per-``n`` functions (``vanilla_plan`` ... ``dropout_plan``) are the readable definitions;
``Planner.plan_batch`` is the vectorised form the packer uses: ``[B, L]`` arrays, row ``b`` holding the
plan of ``lengths[b]`` items left-aligned and padded with ``PAD`` kind / ``-1`` group. Deterministic plans
(vanilla, PFT-I, PFT-S) depend only on ``n``, so they are cached per ``n`` and gathered; random plans draw one
uniform per item from the given ``np.random.Generator`` (the batch path draws a ``[B, L]`` block, so its
stream differs from per-sample calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from patchrec.batching.persrec_layouts import LAYOUTS, PersrecConfig, old_items

PAD, TEXT, ITEM, SESSION, DROP = -1, 0, 1, 2, 3
KIND_NAMES = {TEXT: "TEXT", ITEM: "ITEM", SESSION: "SESSION", DROP: "DROP"}


@dataclass(frozen=True)
class Plan:
    """The plan of one history (see the module docstring)."""

    kinds: np.ndarray  # int8 [n]
    group: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def num_pieces(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"history length n must be >= 0, got {n}")


def _frozen(kinds: np.ndarray, group: np.ndarray) -> Plan:
    # Cached plans are shared between callers: make them read-only so nobody edits the cache by accident.
    kinds = kinds.astype(np.int8)
    group = group.astype(np.int32)
    kinds.flags.writeable = False
    group.flags.writeable = False
    return Plan(kinds, group)


@lru_cache(maxsize=4096)
def vanilla_plan(n: int) -> Plan:
    """Every item as text."""
    _check_n(n)
    return _frozen(np.full(n, TEXT), np.arange(n))


@lru_cache(maxsize=4096)
def pft_i_plan(n: int, k: int) -> Plan:
    """PFT-I: the newest ``k`` items as text, every older item as an item patch."""
    _check_n(n)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    kinds = np.full(n, ITEM)
    kinds[max(n - k, 0) :] = TEXT
    return _frozen(kinds, np.arange(n))


@lru_cache(maxsize=4096)
def pft_s_plan(n: int, g: int) -> Plan:
    """PFT-S: the newest ``g`` items as text, the ``g`` before them as item patches, everything older as
    session patches of ``g`` items cut from the newest end, so that the remainder ((older count) mod ``g``)
    is held by the OLDEST session on its own (docs/method.md §3: "the oldest session holds the remainder")."""
    _check_n(n)
    if g < 1:
        raise ValueError(f"g (session size) must be >= 1, got {g}")
    older = max(n - 2 * g, 0)
    sessions = -(-older // g)
    kinds = np.full(n, SESSION)
    kinds[older:] = ITEM
    kinds[max(n - g, 0) :] = TEXT
    # Sessions are counted from the newest end, so every session but the oldest holds exactly g items.
    from_newest = (older - 1 - np.arange(older)) // g
    group = np.empty(n, dtype=np.int64)
    group[:older] = sessions - 1 - from_newest
    group[older:] = sessions + np.arange(n - older)
    return _frozen(kinds, group)


PERSREC_OLD = ("text", "item")


@lru_cache(maxsize=4096)
def persrec_plan(n: int, segment: int, old: str = "item", layout: str = "segments", window: int = 0,
                 recent: int = 0) -> Plan:  # fmt: skip
    """PerSRec as a plan: the items that go into the state under ``layout`` (full segments of ``segment``
    items from the oldest, or the old window of a window layout of P = ``window`` / R = ``recent``) as item
    patches (``old="item"``) or text, the others as text. Where the personalization tokens go is the packer's
    business."""
    _check_n(n)
    check_persrec_options(segment, 1, old, layout, window, recent)
    config = PersrecConfig(tokens=1, segment=segment, layout=layout, window=window, recent=recent)
    kinds = np.full(n, TEXT)
    kinds[: int(old_items(config, np.array([n]))[0])] = ITEM if old == "item" else TEXT
    return _frozen(kinds, np.arange(n))


def check_persrec_options(
    segment: int, tokens: int, old: str, layout: str = "segments", window: int = 0, recent: int = 0,
    unroll: int = 0,
) -> None:  # fmt: skip
    """The persrec plan's options, named by their flags (the planner and the training config both check)."""
    if segment < 1:
        raise ValueError(f"--persrec-segment must be >= 1, got {segment}")
    if tokens < 1:
        raise ValueError(f"--persrec-tokens must be >= 1, got {tokens}")
    if old not in PERSREC_OLD:
        raise ValueError(f"--persrec-old must be one of {PERSREC_OLD}, got {old!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"--persrec-layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "window" and (window < 1 or recent < 1):
        raise ValueError(f"--persrec-layout window needs --persrec-window >= 1 and --persrec-recent >= 1, "
                         f"got {window} and {recent}")  # fmt: skip
    if unroll < 0:
        raise ValueError(f"--persrec-unroll must be >= 0, got {unroll}")


def persrec_old_items(n, segment: int):
    """History items in full old segments (before the 1..segment recent items); 0 for an empty history."""
    config = PersrecConfig(tokens=1, segment=segment)
    return old_items(config, n)


def _random_plan(n: int, p: float, rng: np.random.Generator, kind: int) -> Plan:
    _check_n(n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    chosen = rng.random(n) < p
    kinds = np.where(chosen, kind, TEXT).astype(np.int8)
    return Plan(kinds, _groups_of(kinds[None])[0])


def pretrain_plans(n: int, p: float, rng: np.random.Generator) -> tuple[Plan, Plan]:
    """Patch pre-training: (all-text view, compressed view); each item is an item patch w.p. ``p``."""
    return vanilla_plan(n), _random_plan(n, p, rng, ITEM)


def dropout_plan(n: int, p: float, rng: np.random.Generator) -> Plan:
    """Dropout ablation: each item independently deleted (with its separator) w.p. ``p``."""
    return _random_plan(n, p, rng, DROP)


def _groups_of(kinds: np.ndarray) -> np.ndarray:
    """Groups when every kept item is its own piece (no sessions): running count of kept items."""
    kept = (kinds != DROP) & (kinds != PAD)
    return np.where(kept, np.cumsum(kept, axis=1) - 1, -1).astype(np.int32)


@dataclass(frozen=True)
class BatchPlan:
    """Plans of a batch of histories, ``[B, L]`` left-aligned (see the module docstring)."""

    kinds: np.ndarray  # int8 [B, L], PAD beyond each history
    group: np.ndarray  # int32 [B, L], -1 for PAD and DROP


def _stack(plans: list[Plan], width: int) -> BatchPlan:
    kinds = np.full((len(plans), width), PAD, dtype=np.int8)
    group = np.full((len(plans), width), -1, dtype=np.int32)
    for b, plan in enumerate(plans):
        kinds[b, : len(plan)] = plan.kinds
        group[b, : len(plan)] = plan.group
    return BatchPlan(kinds, group)


def stack_plans(plans: list[Plan], width: int | None = None) -> BatchPlan:
    """Per-sample plans -> one ``BatchPlan`` (e.g. to pack plans drawn one by one)."""
    width = max((len(p) for p in plans), default=0) if width is None else width
    return _stack(plans, width)


@dataclass(frozen=True)
class Planner:
    """A named plan with its parameters; ``plan``/``plan_batch`` give one entry per view.

    ``p=None`` for ``pretrain``/``dropout`` is the linear curriculum (docs/method.md §3): ``p`` = step /
    total steps of the run (training passes it to the packer as ``progress``).

    ``pretrain`` and ``dropout`` give two views per sample: the all-text history first, then the compressed
    (pretrain) or thinned (dropout) one, so the model sees both forms of the same items side by side.
    """

    name: str  # one of PLANS
    k: int = 5  # pft-i: newest items kept as text
    g: int = 5  # pft-s: session size (also the number of text and of item-patch items)
    p: float | None = None  # pretrain / dropout probability; None = curriculum
    segment: int = 20  # persrec: items per old-history segment
    tokens: int = 4  # persrec: personalization tokens T after each segment (released configs: 4)
    old: str = "item"  # persrec: old items as item patches ("item") or as text ("text")
    layout: str = "segments"  # persrec: segments, window or rolling (patchrec.batching.persrec_layouts)
    window: int = 0  # persrec window layout: P, old items compressed into the tokens
    recent: int = 0  # persrec window layout: R, newest items as text
    unroll: int = 0  # persrec rolling layout, training: cut the gradient every U segments (0: never)

    def __post_init__(self) -> None:
        if self.name not in PLANS:
            raise ValueError(f"plan name must be one of {sorted(PLANS)}, got {self.name!r}")
        check_persrec_options(self.segment, self.tokens, self.old, self.layout, self.window, self.recent,
                              self.unroll)  # fmt: skip
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.g < 1:
            raise ValueError(f"g must be >= 1, got {self.g}")
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")

    @property
    def views(self) -> int:
        return 2 if self.is_random else 1

    @property
    def is_persrec(self) -> bool:
        return self.name == "persrec"

    @property
    def persrec(self) -> PersrecConfig | None:
        """The persrec plan's layout options (None for the other plans)."""
        if not self.is_persrec:
            return None
        return PersrecConfig(tokens=self.tokens, segment=self.segment, layout=self.layout, window=self.window,
                             recent=self.recent, unroll=self.unroll)  # fmt: skip

    @property
    def is_random(self) -> bool:
        return self.name in ("pretrain", "dropout")

    def plan(self, n: int, rng: np.random.Generator | None = None, progress: float = 0.0) -> tuple[Plan, ...]:
        """The plan(s) of one history of ``n`` items (one per view)."""
        if self.name == "vanilla":
            return (vanilla_plan(n),)
        if self.name == "pft-i":
            return (pft_i_plan(n, self.k),)
        if self.name == "pft-s":
            return (pft_s_plan(n, self.g),)
        if self.name == "persrec":
            return (persrec_plan(n, self.segment, self.old, self.layout, self.window, self.recent),)
        rng = _need_rng(rng, self.name)
        p = progress if self.p is None else self.p
        if self.name == "pretrain":
            return pretrain_plans(n, p, rng)
        return vanilla_plan(n), dropout_plan(n, p, rng)

    def plan_batch(
        self,
        lengths: np.ndarray,
        rng: np.random.Generator | None = None,
        progress: np.ndarray | None = None,
        width: int | None = None,
    ) -> tuple[BatchPlan, ...]:
        """Vectorised plans of histories of ``lengths[b]`` items: ``[B, width]`` arrays, one per view."""
        lengths = np.asarray(lengths, dtype=np.int64)
        width = int(lengths.max(initial=0)) if width is None else width
        if lengths.size and (lengths.min() < 0 or lengths.max() > width):
            raise ValueError(f"lengths must be in [0, {width}]")
        if not self.is_random:
            kinds, group = _table(self, width)
            return (BatchPlan(kinds[lengths], group[lengths]),)
        rng = _need_rng(rng, self.name)
        if self.p is not None:
            p = np.full((len(lengths), 1), self.p)
        elif progress is None:
            raise ValueError(f"plan {self.name!r} with p=None (curriculum) needs progress per sample")
        else:
            p = np.asarray(progress, dtype=np.float64).reshape(-1, 1)
        valid = np.arange(width) < lengths[:, None]
        chosen = rng.random((len(lengths), width)) < p
        kind = ITEM if self.name == "pretrain" else DROP
        kinds = np.where(valid, np.where(chosen, kind, TEXT), PAD).astype(np.int8)
        compressed = BatchPlan(kinds, _groups_of(kinds))
        text_kinds = np.where(valid, TEXT, PAD).astype(np.int8)
        return BatchPlan(text_kinds, _groups_of(text_kinds)), compressed


def _need_rng(rng: np.random.Generator | None, name: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"plan {name!r} is random: pass rng (a np.random.Generator)")
    return rng


@lru_cache(maxsize=64)
def _table(planner: Planner, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``[width+1, width]`` tables: row ``n`` = the cached plan of ``n`` items, padded."""
    plans = [planner.plan(n)[0] for n in range(width + 1)]
    batch = _stack(plans, width)
    batch.kinds.flags.writeable = False
    batch.group.flags.writeable = False
    return batch.kinds, batch.group


PLANS = ("vanilla", "pft-i", "pft-s", "pretrain", "dropout", "persrec")


def evaluation_plan(stage: str, val_plan: str | None = None) -> str:
    """The plan a model trained in ``stage`` is validated and evaluated with: ``val_plan`` when set, else the
    stage itself when it has one view, else pft-i (pre-training / dropout trained both forms)."""
    return val_plan or (stage if stage in ("vanilla", "pft-i", "pft-s", "persrec") else "pft-i")


def make_planner(
    name: str, k: int = 5, g: int = 5, p: float | None = None, *, segment: int = 20, tokens: int = 4,
    old: str = "item", layout: str = "segments", window: int = 0, recent: int = 0, unroll: int = 0,
) -> Planner:  # fmt: skip
    """Planner by name (the CLI and the training configs pick plans this way); ``segment``, ``tokens``,
    ``old``, ``layout``, ``window``, ``recent`` and ``unroll`` are the persrec plan's (ignored by the
    others)."""
    return Planner(name, k=k, g=g, p=p, segment=segment, tokens=tokens, old=old, layout=layout,
                   window=window, recent=recent, unroll=unroll)  # fmt: skip
