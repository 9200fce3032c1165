"""The release format of the processed datasets (``shared/data/README.md``): read it into a ``Dataset``
and write a ``Dataset`` back out.

A release directory holds three files:

- ``id2title.txt``: ``item_id||title``, one item a line, ids strictly increasing (the whole catalog).
- ``sequences.jsonl``: one user a line, ``{"user": row, "items": [...], "train": [s, e] | null,
  "val": [s, e] | null, "test": [s, e] | null}``; a split's range is inclusive positions into ``items``.
- ``prompt.txt``: line 1 the system message, line 2 the user message with ``[HISTORY_SEQUENCE]``.

Item ids. The MovieLens-1M release keeps MovieLens ids minus one, so its 3,883 ids run from 0 to 3,951 with
69 gaps (movies absent from the MovieLens table). ``Dataset.titles`` is indexed by item id and every entry
is a catalog item (evaluation ranks all of them), so the loader maps the file's ids to their rank
(0..N-1); with no gaps (ML-100K, Goodreads) that is the identity. ``read_id2title`` gives the file's ids,
and ``write_release(..., item_ids=...)`` writes them back, byte for byte.

Validation is done while reading: every error is a ``ValueError("<file>:<line>: ...")`` and a missing file
is a ``FileNotFoundError``; nothing is dropped or repaired silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from patchrec.data.dataset import HISTORY_PLACEHOLDER, SPLITS, Dataset

ID2TITLE = "id2title.txt"
SEQUENCES = "sequences.jsonl"
PROMPT = "prompt.txt"
TITLE_SEP = "||"
_SEQ_KEYS = ("user", "items", *SPLITS)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc})") from exc


def _lines(text: str) -> list[str]:
    """Lines of a file that may or may not end with a newline (a final newline adds no empty line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _is_int(value: object) -> bool:
    # json gives bool for true/false, which is an int subclass: refuse it as an id or position.
    return isinstance(value, int) and not isinstance(value, bool)


def read_id2title(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``(ids int64 [N], titles)`` of an ``id2title.txt`` (or of the release directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / ID2TITLE
    ids: list[int] = []
    titles: list[str] = []
    for lineno, line in enumerate(_lines(_read_text(path)), start=1):
        where = f"{path}:{lineno}"
        if line.endswith("\r"):
            raise ValueError(f"{where}: carriage return in line (expected '\\n' line ends)")
        key, sep, title = line.partition(TITLE_SEP)
        if not sep:
            raise ValueError(f"{where}: expected 'item_id{TITLE_SEP}title', got {line[:80]!r}")
        try:
            item_id = int(key)
        except ValueError:
            raise ValueError(f"{where}: item id {key!r} is not an integer") from None
        if item_id < 0:
            raise ValueError(f"{where}: negative item id {item_id}")
        if ids and item_id == ids[-1]:
            raise ValueError(f"{where}: duplicate item id {item_id}")
        if ids and item_id < ids[-1]:
            raise ValueError(f"{where}: item id {item_id} after {ids[-1]} (ids must be strictly increasing)")
        if not title.strip():
            raise ValueError(f"{where}: empty title for item {item_id}")
        ids.append(item_id)
        titles.append(title)
    if not ids:
        raise ValueError(f"{path}: no items")
    return np.asarray(ids, dtype=np.int64), titles


def read_prompt(path: str | Path) -> tuple[str, str]:
    """``(system, user)`` prompts of a ``prompt.txt`` (or of the release directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROMPT
    lines = _lines(_read_text(path))
    if len(lines) != 2:
        raise ValueError(f"{path}: expected exactly 2 lines (system, user), got {len(lines)}")
    system, user = lines
    if not system.strip():
        raise ValueError(f"{path}:1: empty system prompt")
    count = user.count(HISTORY_PLACEHOLDER)
    if count != 1:
        raise ValueError(
            f"{path}:2: user prompt must contain {HISTORY_PLACEHOLDER} exactly once, has {count}"
        )
    return system, user


def _parse_range(value: object, name: str, length: int, where: str) -> tuple[int, int]:
    if value is None:
        return (-1, -1)
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
        raise ValueError(f"{where}: {name!r} must be null or [start, end] integers, got {value!r}")
    start, end = value
    if end < start:
        raise ValueError(f"{where}: {name!r} range {value} ends before it starts")
    if start < 0 or end >= length:
        raise ValueError(f"{where}: {name!r} range {value} outside the user's {length} items")
    return (start, end)


def load_release(path: str | Path, name: str | None = None) -> Dataset:
    """Read a release directory into a ``Dataset`` (item ids mapped to 0..N-1, see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such release directory")
    file_ids, titles = read_id2title(root / ID2TITLE)
    system, user_prompt = read_prompt(root / PROMPT)
    num_ids = int(file_ids[-1]) + 1
    # file id -> dense id; -1 marks ids absent from the catalog
    dense = np.full(num_ids, -1, dtype=np.int64)
    dense[file_ids] = np.arange(len(file_ids))

    seq_path = root / SEQUENCES
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    users: list[int] = []
    ranges: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    seen_users: dict[int, int] = {}
    for lineno, line in enumerate(_lines(_read_text(seq_path)), start=1):
        where = f"{seq_path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if set(record) != set(_SEQ_KEYS):
            missing = sorted(set(_SEQ_KEYS) - set(record))
            extra = sorted(set(record) - set(_SEQ_KEYS))
            raise ValueError(
                f"{where}: keys must be {list(_SEQ_KEYS)} (missing {missing}, unexpected {extra})"
            )
        user = record["user"]
        if not _is_int(user):
            raise ValueError(f"{where}: 'user' must be an integer, got {user!r}")
        if user in seen_users:
            raise ValueError(f"{where}: duplicate user {user} (first on line {seen_users[user]})")
        seen_users[user] = lineno
        raw_items = record["items"]
        if not isinstance(raw_items, list) or not all(_is_int(i) for i in raw_items):
            raise ValueError(f"{where}: 'items' must be a list of integer item ids")
        items = np.asarray(raw_items, dtype=np.int64)
        if len(items):
            bad = (items < 0) | (items >= num_ids)
            bad[~bad] = dense[items[~bad]] < 0
            if bad.any():
                raise ValueError(f"{where}: unknown item id {int(items[np.argmax(bad)])} (not in {ID2TITLE})")
        previous_end, previous_name = -1, None
        for split in SPLITS:
            start, end = _parse_range(record[split], split, len(items), where)
            if start >= 0:
                if start <= previous_end:
                    raise ValueError(
                        f"{where}: {split!r} range {record[split]} overlaps or precedes {previous_name!r} "
                        f"(splits must be disjoint and in the order {', '.join(SPLITS)})"
                    )
                previous_end, previous_name = end, split
            ranges[split].append((start, end))
        chunks.append(dense[items] if len(items) else items)
        lengths.append(len(items))
        users.append(user)

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dataset = Dataset(
        name=name or root.name,
        titles=titles,
        items=(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)).astype(np.int32),
        user_offsets=offsets,
        user_ids=np.asarray(users, dtype=np.int64),
        splits={s: np.asarray(ranges[s], dtype=np.int64).reshape(-1, 2) for s in SPLITS},
        system_prompt=system,
        user_prompt=user_prompt,
    )
    dataset.check()
    return dataset


def write_release(
    dataset: Dataset,
    path: str | Path,
    item_ids: np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``dataset`` as a release directory (``path`` is created; existing files are refused unless
    ``overwrite``). ``item_ids[i]`` is the id written for dataset item ``i`` (default: ``i``); it must be
    strictly increasing so that the file stays sorted. ``progress`` shows a tqdm bar over users.
    Returns the directory."""
    dataset.check()
    root = Path(path)
    if item_ids is None:
        item_ids = np.arange(dataset.num_items, dtype=np.int64)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if item_ids.shape != (dataset.num_items,):
        raise ValueError(f"item_ids must have shape [{dataset.num_items}], got {list(item_ids.shape)}")
    if len(item_ids) and (item_ids[0] < 0 or np.any(np.diff(item_ids) <= 0)):
        raise ValueError("item_ids must be non-negative and strictly increasing")
    for i, title in enumerate(dataset.titles):
        if not title.strip() or "\n" in title or "\r" in title:
            raise ValueError(f"titles[{i}] = {title!r} is empty or contains a line break")
    for label, text in (("system_prompt", dataset.system_prompt), ("user_prompt", dataset.user_prompt)):
        if "\n" in text or "\r" in text or not text.strip():
            raise ValueError(f"{label} must be one non-empty line")
    if len(np.unique(dataset.user_ids)) != dataset.num_users:
        raise ValueError("user_ids must be unique")
    root.mkdir(parents=True, exist_ok=True)
    for file in (ID2TITLE, SEQUENCES, PROMPT):
        if (root / file).exists() and not overwrite:
            raise ValueError(f"{root / file}: already exists (pass overwrite=True to replace it)")

    with open(root / ID2TITLE, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(
            f"{int(i)}{TITLE_SEP}{t}\n" for i, t in zip(item_ids.tolist(), dataset.titles, strict=True)
        )
    file_items = item_ids[dataset.items].tolist()
    offsets = dataset.user_offsets.tolist()
    split_lists = {s: dataset.splits[s].tolist() for s in SPLITS}
    with open(root / SEQUENCES, "w", encoding="utf-8", newline="\n") as f:
        users = dataset.user_ids.tolist()
        bar = tqdm(
            users, desc=f"writing {SEQUENCES}", unit=" users", disable=not progress or len(users) < 10_000
        )
        for u, user in enumerate(bar):
            record = {"user": user, "items": file_items[offsets[u] : offsets[u + 1]]}
            for s in SPLITS:
                start, end = split_lists[s][u]
                record[s] = [start, end] if start >= 0 else None
            f.write(json.dumps(record) + "\n")
    # The released prompt.txt has no newline after line 2; keep it identical.
    (root / PROMPT).write_text(f"{dataset.system_prompt}\n{dataset.user_prompt}", encoding="utf-8")
    return root
