"""Settings of ``patchrec serve`` (the command's flags; docs/serve.md explains them)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# The window layout's refold interval: on ML-1M a state up to 50 interactions old loses no measurable HR@20 /
# NDCG@10 for SASRec or HSTU (benches/results/persrec-staleness-ml1m); half of that, to keep a margin.
DEFAULT_REFOLD_EVERY = 25


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # address to bind; any address but loopback needs token_file
    port: int = 8000  # TCP port; 0 = any free port (the one chosen is printed)
    db: str | None = None  # SQLite file of users and states; None = serve.sqlite in the model directory
    token_file: str | None = None  # file holding the bearer token every request must carry
    batch_window_ms: float = 5.0  # after a request arrives, wait this long for others to join its batch
    batch_rows: int = 4096  # row budget of one batch (history rows read by its recommendations)
    batch_requests: int = 64  # most requests in one batch; 1 = batching off
    queue_size: int = 256  # requests waiting for the worker; one more gets 503 + Retry-After
    timeout_s: float = 30.0  # per request, from arrival to answer; past it: 504
    drain_s: float = 60.0  # on SIGTERM, how long in-flight requests may take to finish
    max_k: int = 100  # largest k a request may ask for (also capped by the catalog / beams)
    max_history: int = 2000  # most items of an inline history
    max_event_items: int = 1000  # most items in one events request
    max_users: int = 64  # most users in one recommend request
    max_body_bytes: int = 1 << 20  # largest request body (413 past it)
    refold_every: int = DEFAULT_REFOLD_EVERY  # PerSRec window layout: rebuild a state every m interactions

    def __post_init__(self) -> None:
        positive = {"batch_rows": self.batch_rows, "batch_requests": self.batch_requests,
                    "queue_size": self.queue_size, "max_k": self.max_k, "max_history": self.max_history,
                    "max_event_items": self.max_event_items, "max_users": self.max_users,
                    "max_body_bytes": self.max_body_bytes, "refold_every": self.refold_every}  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.batch_window_ms < 0 or self.timeout_s <= 0 or self.drain_s <= 0:
            raise ValueError("--batch-window-ms must be >= 0, --timeout-s and --drain-s > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not is_loopback(self.host) and not self.token_file:
            raise ValueError(f"--host {self.host} is not a loopback address: binding it needs --token-file "
                             "(a bearer token every request must carry)")  # fmt: skip


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed; at least 16 characters)."""
    try:
        token = open(path, encoding="utf-8").read().strip()
    except OSError as err:
        raise FileNotFoundError(f"--token-file {path}: cannot be read ({err.strerror})") from err
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"--token-file {path}: the token must be one word of at least 16 characters")
    return token


__all__ = ["DEFAULT_REFOLD_EVERY", "ServeConfig", "is_loopback", "read_token"]
