"""Raw MovieLens-100K / MovieLens-1M files -> ``Dataset``, as docs/method.md §4 describes.

Conventions (reverse-engineered from the PatchRec release and checked against it on raw ML-100K):

- Interactions: ratings >= 4. ML-100K keeps users with more than 20 such ratings (ML-1M keeps every user).
- Users: in order of their first kept rating in the ratings file; ``user_ids`` is that row index, like the
  release's ``user`` field (on ML-100K this reproduces the release's row order exactly).
- Items: the whole movie table is the catalog; dataset item ids are the ranks of the MovieLens ids, which is
  "MovieLens id - 1" whenever the table has no gaps (ML-100K). ML-1M's table has gaps, so the MovieLens ids
  are returned next to the dataset and ``write_release(..., item_ids=movielens_ids - 1)`` writes the
  release's ids (see ``patchrec.data.release``).
- Each user's items are ordered by (timestamp, item id). The release orders same-second ratings in an order
  that is not recoverable from the raw files (not file order, not item order, not a numpy/pandas sort that
  we could reproduce); item sets, split sizes and every non-tied position agree.
- Split: with n kept interactions sorted by timestamp, the train boundary is the timestamp of the
  ``n * 48 // 50``-th one and the validation boundary that of the ``n * 49 // 50``-th one; an interaction
  is train if its timestamp <= the train boundary, validation if <= the validation boundary, else test. So a
  group of same-second ratings is never split: ties at a boundary go to the earlier split. This reproduces
  the release's split sizes exactly (ML-100K: 49,753 / 1,035 / 1,036; plain positional cuts would give
  49,751 / 1,036 / 1,037) and makes the split independent of how ties are ordered. Each user's items in a
  split are contiguous (they are time-ordered), stored as an inclusive position range.
- Titles: see ``normalize_title``. The raw files lost some accents (``Mis?rables`` in ML-1M,
  ``Miserables`` in ML-100K) that the release has (``Misérables``); they cannot be recovered from the raw
  files and are kept as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from patchrec.data.dataset import Dataset
from patchrec.data.interactions import build_dataset

SYSTEM_PROMPT = "You are a helpful assistant in movie recommendations."
USER_PROMPT = (
    "A user has watched [HISTORY_SEQUENCE]. Please recommend one movie for this user to watch next with its "
    "title only and without any explanation."
)
MIN_RATING = 4
FORMATS = {
    # format -> (ratings file, movies file, keep users with more than this many kept ratings)
    "ml-100k": ("u.data", "u.item", 20),
    "ml-1m": ("ratings.dat", "movies.dat", 0),
}

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLES = ("The", "A", "An")
# One ratings line after "::" -> tab; the whole-file pattern checks 1M lines in ~0.5 s.
_RATINGS_LINE = re.compile(r"\d+\t\d+\t\d+\t\d+")
_RATINGS_TEXT = re.compile(r"(?:\d+\t\d+\t\d+\t\d+\n)*(?:\d+\t\d+\t\d+\t\d+)?")


def normalize_title(raw: str) -> str:
    """MovieLens title -> the release's title: drop the year and everything from the first `` (`` on
    (alternate titles), drop leading quotes (the release has ``Til There Was You``, ``The burbs``), and move
    a trailing ``, The`` / ``, A`` / ``, An`` to the front. Other trailing articles (``Postino, Il``,
    ``Cérémonie, La``) stay where they are, as in the release."""
    title = _YEAR.sub("", raw.strip())
    # Alternate titles: "Seven (Se7en)", "Shanghai Triad (Yao a yao yao dao waipo qiao)".
    title = title.split(" (", 1)[0].strip()
    title = title.lstrip("'\"").strip()
    for article in _ARTICLES:
        suffix = ", " + article
        if title.endswith(suffix):
            title = f"{article} {title[: -len(suffix)]}"
            break
    return title


def detect_format(raw_dir: str | Path) -> str:
    """``ml-100k`` or ``ml-1m`` from the ratings file present in ``raw_dir``."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: no such directory")
    found = [fmt for fmt, (ratings, _, _) in FORMATS.items() if (raw_dir / ratings).is_file()]
    if len(found) != 1:
        expected = " or ".join(r for r, _, _ in FORMATS.values())
        raise ValueError(
            f"{raw_dir}: cannot detect the MovieLens format (expected exactly one of {expected})"
        )
    return found[0]


def _read_latin1(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path.read_text(encoding="latin-1")


def read_movies(path: str | Path, fmt: str) -> tuple[np.ndarray, list[str]]:
    """``(movielens_ids int64 [M], raw titles)`` of ``u.item`` / ``movies.dat``, sorted by id."""
    path = Path(path)
    sep = "|" if fmt == "ml-100k" else "::"
    ids: list[int] = []
    titles: list[str] = []
    for lineno, line in enumerate(_read_latin1(path).splitlines(), start=1):
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: empty line")
        fields = line.split(sep)
        if len(fields) < 3:
            raise ValueError(f"{path}:{lineno}: expected id{sep}title{sep}..., got {line[:80]!r}")
        try:
            movie_id = int(fields[0])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: movie id {fields[0]!r} is not an integer") from None
        if movie_id < 1:
            raise ValueError(f"{path}:{lineno}: movie id {movie_id} < 1")
        if not fields[1].strip():
            raise ValueError(f"{path}:{lineno}: empty title for movie {movie_id}")
        ids.append(movie_id)
        titles.append(fields[1])
    if not ids:
        raise ValueError(f"{path}: no movies")
    movie_ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(movie_ids, kind="stable")
    movie_ids = movie_ids[order]
    dup = np.flatnonzero(np.diff(movie_ids) == 0)
    if len(dup):
        raise ValueError(f"{path}: duplicate movie id {int(movie_ids[dup[0]])}")
    return movie_ids, [titles[i] for i in order]


def read_ratings(path: str | Path, fmt: str) -> np.ndarray:
    """int64 ``[n, 4]`` rows ``(user, movie, rating, timestamp)`` in file order."""
    path = Path(path)
    text = _read_latin1(path)
    if fmt == "ml-1m":
        text = text.replace("::", "\t")
    if _RATINGS_TEXT.fullmatch(text) is None:
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the file
        for lineno, line in enumerate(lines, start=1):
            if _RATINGS_LINE.fullmatch(line) is None:
                shown = line.replace("\t", "::" if fmt == "ml-1m" else "\t")
                raise ValueError(
                    f"{path}:{lineno}: expected 4 integers user, item, rating, timestamp: {shown[:80]!r}"
                )
    # Validated above, so the fast whitespace parser cannot stop early on a bad token.
    rows = np.fromstring(text, dtype=np.int64, sep=" ")
    return rows.reshape(-1, 4)


def load_movielens(raw_dir: str | Path, fmt: str | None = None) -> tuple[Dataset, np.ndarray]:
    """Raw MovieLens directory -> ``(dataset, movielens_ids)``; ``movielens_ids[i]`` is the MovieLens id of
    dataset item ``i`` (write the release with ``item_ids=movielens_ids - 1``)."""
    raw_dir = Path(raw_dir)
    fmt = fmt or detect_format(raw_dir)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    ratings_name, movies_name, min_user_ratings = FORMATS[fmt]
    movie_ids, raw_titles = read_movies(raw_dir / movies_name, fmt)
    titles = [normalize_title(t) for t in raw_titles]
    for i, title in enumerate(titles):
        if not title:
            raise ValueError(
                f"{raw_dir / movies_name}: movie {int(movie_ids[i])} title {raw_titles[i]!r} "
                "is empty after normalisation"
            )
    ratings_path = raw_dir / ratings_name
    rows = read_ratings(ratings_path, fmt)
    known = np.isin(rows[:, 1], movie_ids)
    if not known.all():
        bad = int(np.argmin(known))
        raise ValueError(f"{ratings_path}:{bad + 1}: movie {int(rows[bad, 1])} is not in {movies_name}")
    rows = rows[rows[:, 2] >= MIN_RATING]
    if min_user_ratings:
        users, counts = np.unique(rows[:, 0], return_counts=True)
        rows = rows[np.isin(rows[:, 0], users[counts > min_user_ratings])]
    if len(rows) == 0:
        raise ValueError(f"{ratings_path}: no ratings left after filtering (rating >= {MIN_RATING})")
    pairs = rows[:, 0] * (int(movie_ids[-1]) + 1) + rows[:, 1]
    if len(np.unique(pairs)) != len(pairs):
        raise ValueError(f"{ratings_path}: a user rated the same movie twice")
    items = np.searchsorted(movie_ids, rows[:, 1])
    dataset = build_dataset(fmt, titles, rows[:, 0], items, rows[:, 3], SYSTEM_PROMPT, USER_PROMPT)
    return dataset, movie_ids
