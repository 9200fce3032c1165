"""Where ``patchrec serve`` keeps users: their interactions and their PerSRec states, behind a small
interface (``Storage``) with one implementation, SQLite (one file, WAL mode; a server-grade engine can
implement the same methods later).

- Interactions are appended in one transaction per batch of event requests, committed (``synchronous=FULL``:
  the WAL is fsynced) before any of them is acknowledged, so an acknowledged event survives a crash of the
  process or the machine. A request may carry a ``request_id``: a repeat of it (a client retrying after a
  timeout or a crash) is answered from the first write and appends nothing, so a retried event is stored once.
- A PerSRec state is stored as safetensors bytes (``patchrec.persrec.stored``) next to the fingerprint of the
  model that made it and the range of the history it covers (with a hash of those items), written in one
  statement, so a reader sees the old row or the new one, never a mix. A state made by another model, or one
  whose items do not match the history, is simply rebuilt from the interactions.

No pickle anywhere: rows are integers, text and safetensors bytes.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    length INTEGER NOT NULL,          -- interactions stored (= rows in events)
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,             -- 0, 1, ... per user, oldest first
    item INTEGER NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,      -- a client's id for an events request (retries are answered once)
    user_id TEXT NOT NULL,
    first INTEGER NOT NULL,           -- seq of its first item
    count INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS states (
    user_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,        -- the model that made it
    start INTEGER NOT NULL,           -- history range [start, end) folded into it
    end INTEGER NOT NULL,
    built_at INTEGER NOT NULL,        -- history length when it was (re)built (window layout: refold age)
    items_hash TEXT NOT NULL,         -- sha256 of the items [start, end) as int64
    tensor_bytes INTEGER NOT NULL,    -- bytes of its tensors (keys/values or memory)
    data BLOB NOT NULL                -- safetensors bytes
) WITHOUT ROWID;
"""


def items_hash(items: np.ndarray) -> str:
    """sha256 of item ids as little-endian int64: ties a stored state to the exact items it was built from."""
    return hashlib.sha256(np.ascontiguousarray(items, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class Ack:
    """The outcome of one events request."""

    user: str
    first: int  # position of its first item in the user's history
    count: int  # items it appended
    length: int  # the user's history length after it (when replayed: now)
    created: bool  # this request created the user
    replayed: bool  # a repeat of an earlier request_id: nothing appended


@dataclass(frozen=True)
class StateRow:
    """A stored PerSRec state (``data``: safetensors bytes) and what it covers."""

    fingerprint: str
    start: int
    end: int
    built_at: int
    items_hash: str
    tensor_bytes: int
    data: bytes


@dataclass(frozen=True)
class EventWrite:
    user: str
    items: tuple[int, ...]
    request_id: str | None = None


class RequestIdConflict(ValueError):
    """A request_id reused for another user or other items."""


class Storage(Protocol):
    """What the server needs from a store of users (implemented by ``SQLiteStorage``)."""

    def append(self, writes: list[EventWrite]) -> list[Ack | Exception]: ...

    def lengths(self, users: list[str]) -> dict[str, int]: ...

    def histories(self, users: list[str]) -> dict[str, np.ndarray]: ...

    def states(self, users: list[str]) -> dict[str, StateRow]: ...

    def save_states(self, rows: dict[str, StateRow]) -> None: ...

    def state_info(self, user: str) -> tuple[str, int, int, int] | None: ...

    def max_item(self) -> int | None: ...

    def close(self) -> None: ...


class SQLiteStorage:
    """``Storage`` in one SQLite file in WAL mode.

    Writes and the worker's reads go through one connection, used by one thread at a time (the server's
    model worker); ``reader()`` gives another connection for the request handlers' cheap look-ups (WAL lets
    readers run beside the writer and see only committed transactions).
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--db {self.path}: directory {self.path.parent} does not exist")
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self.conn = self._connect()
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(f"--db {self.path}: schema version {version}, this patchrec writes "
                             f"{SCHEMA_VERSION}")
        with self._lock:
            self.conn.executescript(SCHEMA)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise ValueError(f"--db {self.path}: not a usable SQLite database ({err})") from err
        if str(mode).lower() != "wal":
            raise ValueError(f"--db {self.path}: cannot switch to WAL mode (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    def reader(self) -> SQLiteStorage:
        """A second handle on the same file with its own connection (for another thread)."""
        other = object.__new__(SQLiteStorage)
        other.path, other.synchronous, other._lock = self.path, self.synchronous, threading.Lock()
        other.conn = other._connect()
        return other

    # --- interactions ---

    def append(self, writes: list[EventWrite]) -> list[Ack | Exception]:
        """Append every write in one transaction (committed before this returns); per write its ``Ack``, or a
        ``RequestIdConflict`` for a request_id already used for something else (that write appends nothing).
        A database error rolls the whole transaction back and raises."""
        out: list[Ack | Exception] = []
        with self._lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for write in writes:
                    out.append(self._append_one(cur, write))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return out

    def _append_one(self, cur: sqlite3.Cursor, write: EventWrite) -> Ack | Exception:
        row = cur.execute("SELECT length FROM users WHERE user_id = ?", (write.user,)).fetchone()
        length = 0 if row is None else int(row[0])
        if write.request_id is not None:
            seen = cur.execute("SELECT user_id, first, count FROM requests WHERE request_id = ?",
                               (write.request_id,)).fetchone()  # fmt: skip
            if seen is not None:
                user, first, count = seen[0], int(seen[1]), int(seen[2])
                stored = [r[0] for r in cur.execute(
                    "SELECT item FROM events WHERE user_id = ? AND seq >= ? AND seq < ? ORDER BY seq",
                    (user, first, first + count))]  # fmt: skip
                if user != write.user or tuple(stored) != write.items:
                    return RequestIdConflict(
                        f"request_id {write.request_id!r} was already used for other events (user {user!r})"
                    )
                return Ack(write.user, first, count, length, False, True)
        if row is None:
            cur.execute("INSERT INTO users (user_id, length, created) VALUES (?, 0, ?)",
                        (write.user, time.time()))  # fmt: skip
        rows = [(write.user, length + i, int(item)) for i, item in enumerate(write.items)]
        cur.executemany("INSERT INTO events (user_id, seq, item) VALUES (?, ?, ?)", rows)
        cur.execute("UPDATE users SET length = ? WHERE user_id = ?", (length + len(write.items), write.user))
        if write.request_id is not None:
            cur.execute("INSERT INTO requests (request_id, user_id, first, count) VALUES (?, ?, ?, ?)",
                        (write.request_id, write.user, length, len(write.items)))  # fmt: skip
        return Ack(write.user, length, len(write.items), length + len(write.items), row is None, False)

    def lengths(self, users: list[str]) -> dict[str, int]:
        """History length of each known user (unknown users are absent)."""
        out: dict[str, int] = {}
        with self._lock:
            for user in dict.fromkeys(users):
                row = self.conn.execute("SELECT length FROM users WHERE user_id = ?", (user,)).fetchone()
                if row is not None:
                    out[user] = int(row[0])
        return out

    def histories(self, users: list[str]) -> dict[str, np.ndarray]:
        """Each known user's items, oldest first (int64), read in one transaction (a consistent snapshot)."""
        out: dict[str, np.ndarray] = {}
        with self._lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN")
            try:
                for user in dict.fromkeys(users):
                    rows = cur.execute("SELECT item FROM events WHERE user_id = ? ORDER BY seq", (user,))
                    items = np.fromiter((r[0] for r in rows), dtype=np.int64)
                    if len(items) or cur.execute("SELECT 1 FROM users WHERE user_id = ?", (user,)).fetchone():
                        out[user] = items
            finally:
                cur.execute("COMMIT")
        return out

    def max_item(self) -> int | None:
        """The largest item id stored (None when there are no events): checked against the model's catalog."""
        with self._lock:
            row = self.conn.execute("SELECT MAX(item) FROM events").fetchone()
        return None if row[0] is None else int(row[0])

    def counts(self) -> tuple[int, int]:
        """(users, events) stored."""
        with self._lock:
            users = self.conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
            events = self.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return int(users), int(events)

    # --- PerSRec states ---

    def states(self, users: list[str]) -> dict[str, StateRow]:
        out: dict[str, StateRow] = {}
        with self._lock:
            for user in dict.fromkeys(users):
                row = self.conn.execute(
                    "SELECT fingerprint, start, end, built_at, items_hash, tensor_bytes, data FROM states "
                    "WHERE user_id = ?", (user,)).fetchone()  # fmt: skip
                if row is not None:
                    out[user] = StateRow(row[0], int(row[1]), int(row[2]), int(row[3]), row[4], int(row[5]),
                                         bytes(row[6]))  # fmt: skip
        return out

    def save_states(self, rows: dict[str, StateRow]) -> None:
        """Insert or replace the states of several users in one transaction."""
        if not rows:
            return
        with self._lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(
                    "INSERT OR REPLACE INTO states (user_id, fingerprint, start, end, built_at, items_hash, "
                    "tensor_bytes, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(u, r.fingerprint, r.start, r.end, r.built_at, r.items_hash, r.tensor_bytes, r.data)
                     for u, r in rows.items()],
                )  # fmt: skip
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def state_info(self, user: str) -> tuple[str, int, int, int] | None:
        """(fingerprint, tensor bytes, stored bytes, covered items) of a user's stored state, or None."""
        with self._lock:
            row = self.conn.execute(
                "SELECT fingerprint, tensor_bytes, LENGTH(data), end - start FROM states WHERE user_id = ?",
                (user,)).fetchone()  # fmt: skip
        return None if row is None else (row[0], int(row[1]), int(row[2]), int(row[3]))

    def close(self) -> None:
        with self._lock:
            try:
                # fold the WAL back into the main file so that the file alone holds everything
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.conn.close()


__all__ = ["Ack", "EventWrite", "RequestIdConflict", "SQLiteStorage", "StateRow", "Storage", "items_hash"]
