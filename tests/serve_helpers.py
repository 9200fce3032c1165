"""Shared pieces of the ``patchrec serve`` tests: tiny baseline model directories (random weights, saved as
``patchrec baseline`` writes them), a server run in a background thread on 127.0.0.1 (any free port), a
subprocess server (``python -m patchrec serve``), and what every served result is compared with."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from patchrec.baselines import HSTU, GRU4Rec, GRU4RecConfig, HSTUConfig, Popularity, SASRec, SASRecConfig
from patchrec.baselines.checkpoint import load_baseline, save_baseline
from patchrec.baselines.train import cu_seqlens_of, score_last

NUM_ITEMS = 41
MAX_LEN = 24
SEGMENT, TOKENS, WINDOW, RECENT = 4, 2, 6, 4
KINDS = {
    "popularity": None,
    "gru4rec": None,
    "sasrec": {},
    "hstu": {},
    "sasrec-segments": dict(persrec_tokens=TOKENS, persrec_segment=SEGMENT),
    "hstu-window": dict(persrec_tokens=TOKENS, persrec_layout="window", persrec_window=WINDOW,
                        persrec_recent=RECENT, max_len=WINDOW + RECENT),
    "sasrec-rolling": dict(persrec_tokens=TOKENS, persrec_layout="rolling", persrec_segment=SEGMENT),
}  # fmt: skip


def make_baseline(root: Path, kind: str, seed: int = 0) -> Path:
    """A ``patchrec baseline`` output directory of ``kind`` (a key of KINDS) with random weights."""
    out = root / kind
    torch.manual_seed(seed)
    name = kind.split("-")[0]
    config = {"model": name, "num_items": NUM_ITEMS, "max_items": MAX_LEN}
    if name == "popularity":
        model = Popularity(np.random.default_rng(seed).integers(0, 9, NUM_ITEMS))  # ties on purpose
    elif name == "gru4rec":
        model_config = GRU4RecConfig(embedding=12, hidden=16, dropout=0.0)
        model = GRU4Rec(NUM_ITEMS, model_config)
        config["model_config"] = dataclasses.asdict(model_config)
    else:
        kw = dict(hidden=16, num_blocks=2, num_heads=2, dropout=0.0, max_len=MAX_LEN) | KINDS[kind]
        model_config = SASRecConfig(**kw) if name == "sasrec" else HSTUConfig(**kw)
        model = (SASRec if name == "sasrec" else HSTU)(NUM_ITEMS, model_config)
        config["model_config"] = dataclasses.asdict(model_config)
    save_baseline(model, config, out)
    return out


def expected_scores(model_dir: Path, history: list[int], *, adds: list[list[int]] | None = None,
                    refold_every: int = 10) -> torch.Tensor:  # fmt: skip
    """What the server must answer for a user: popularity counts; the full forward over the latest L items;
    with PerSRec, ``CachedUser`` fed the same event requests (``adds``, default one request with all)."""
    from patchrec.persrec.sequence import CachedUser

    model, config = load_baseline(model_dir)
    if config["model"] == "popularity":
        return torch.as_tensor(model.counts, dtype=torch.float32)
    with torch.no_grad():
        persrec = getattr(model, "persrec", None)
        long_segments = persrec is not None and persrec.layout == "segments" and len(history) > MAX_LEN
        if persrec is not None and persrec.on and not long_segments:
            user = CachedUser(model, refold_every=refold_every)
            for add in adds or [history]:
                user.add(add)
            return user.scores().float()
        read = np.asarray(history[-MAX_LEN:], dtype=np.int64)
        return score_last(model, torch.from_numpy(read), cu_seqlens_of(np.array([len(read)])))[0].float()


def top(scores: torch.Tensor, k: int, exclude=()) -> tuple[list[int], list[float]]:
    """Reference top-k: best first, equal scores in item order."""
    s = scores.clone()
    if len(exclude):
        s[list(exclude)] = -torch.inf
    pairs = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    keep = [i for i in pairs if np.isfinite(float(s[i]))][:k]
    return keep, [float(s[i]) for i in keep]


def build_app(model_dir: Path, db: Path, *, scorer=None, token=None, **config):
    """(ASGI app, service) for ``model_dir`` (or ``scorer``) on ``db``."""
    from patchrec.serve.app import create_app
    from patchrec.serve.config import ServeConfig
    from patchrec.serve.loading import baseline_scorer
    from patchrec.serve.service import Service
    from patchrec.serve.storage import SQLiteStorage

    config = ServeConfig(db=str(db), **config)
    scorer = scorer or baseline_scorer(model_dir, refold_every=config.refold_every)
    storage = SQLiteStorage(db)
    service = Service(scorer, storage)
    return create_app(service, config, storage.reader(), token=token), service


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn in a background thread on 127.0.0.1 (a free port); yields the base URL."""
    import uvicorn

    from patchrec.serve.server import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def db_dump(db: Path) -> dict[str, list]:
    """Every row of every table (to check that a refused request changed nothing)."""
    conn = sqlite3.connect(db)
    try:
        query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        tables = [r[0] for r in conn.execute(query)]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    finally:
        conn.close()


def stored_history(db: Path, user: str) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT item FROM events WHERE user_id = ? ORDER BY seq", (user,))]
    finally:
        conn.close()


class ServerProcess:
    """``python -m patchrec serve ...`` on 127.0.0.1 and a free port, started and waited for."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchrec", "serve", "--port", "0", "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        )  # fmt: skip
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited before it was ready:\n" + "".join(self.lines))
            self.lines.append(line)
            if "ready on http://" in line:
                self.url = line.split("ready on ")[1].split()[0]
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server not ready within 60 s:\n" + "".join(self.lines))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def output(self) -> str:
        return "".join(self.lines)
