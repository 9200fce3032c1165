"""Running the API under uvicorn: open the database, bind the socket (port 0 = any free port, printed),
serve until SIGTERM / SIGINT, then drain (uvicorn stops accepting connections and waits up to ``drain_s`` for
the requests in flight; the batcher then answers everything still queued) and close the database."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import uvicorn

from patchrec.serve.app import create_app
from patchrec.serve.config import ServeConfig, read_token
from patchrec.serve.scorers import Scorer, warm_up
from patchrec.serve.service import Service
from patchrec.serve.storage import SQLiteStorage

KEEP_ALIVE_S = 75


def open_storage(config: ServeConfig, model_dir: Path, scorer: Scorer) -> SQLiteStorage:
    """The database (``--db``, default ``serve.sqlite`` in the model directory), checked against the
    model's catalog."""
    path = Path(config.db) if config.db else Path(model_dir) / "serve.sqlite"
    storage = SQLiteStorage(path)
    top = storage.max_item()
    if top is not None and top >= scorer.num_items:
        storage.close()
        raise ValueError(f"--db {path} holds item id {top}, outside this model's catalog of "
                         f"{scorer.num_items} items: it was filled for another catalog (pass another --db)")
    return storage


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio switches Nagle's algorithm off (TCP_NODELAY) only on sockets that say
    # they are TCP, and a response written in two parts (headers, body) otherwise waits ~40 ms for the
    # client's delayed ACK on every request after a connection's first
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot bind ({err.strerror})") from err
    sock.set_inheritable(True)
    return sock


def serve(scorer: Scorer, config: ServeConfig, model_dir: Path, *, log_level: str = "warning") -> int:
    """Serve ``scorer`` until a signal; returns the exit code (0 after a graceful drain)."""
    token = read_token(config.token_file) if config.token_file else None
    storage = open_storage(config, model_dir, scorer)
    warm_up(scorer)
    reader = storage.reader()
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def ready() -> None:
        print(f"patchrec serve: {scorer.kind} model ready on http://{shown}:{port} (db {storage.path})",
              flush=True)  # fmt: skip

    app = create_app(Service(scorer, storage), config, reader, token=token, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(config.drain_s),
        # idle keep-alive connections are closed after this; uvicorn's 5 s races with clients that reuse a
        # connection just as it is closed (a failed read on their side): 75 s as common proxies use
        timeout_keep_alive=KEEP_ALIVE_S,
    ))  # fmt: skip
    # uvicorn re-raises the signal that stopped it once it has drained; it then lands here instead of
    # killing the process, so a graceful stop exits 0.
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        reader.close()
        storage.close()
    if not server.started:
        print("patchrec serve: the server did not start", file=sys.stderr)
        return 1
    print(f"patchrec serve: stopped{' by ' + signal.Signals(caught[0]).name if caught else ''}; "
          "requests in flight were answered", flush=True)  # fmt: skip
    return 0


__all__ = ["bind", "open_storage", "serve"]
