"""``patchrec serve`` as a process on 127.0.0.1 (bounded, self-stopping): a small load test (concurrent
clients, a fixed mix of events and recommendations: no errors, every acknowledged event stored exactly once,
p50/p99 and requests/s printed); SIGKILL in the middle of a burst of writes, then a restart (every
acknowledged event is there, nothing twice, every stored PerSRec state is whole and matches the interactions,
and recommendations equal the model's); SIGTERM in the middle of a burst drains the requests in flight and
exits 0."""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import numpy as np
import pytest
import torch
from serve_helpers import NUM_ITEMS, ServerProcess, expected_scores, make_baseline, stored_history, top

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


def test_load_small_concurrent_mix_no_errors_events_stored_once(tmp_path):
    from patchrec.serve.loadgen import LoadConfig, run_load

    model_dir = make_baseline(tmp_path, "sasrec-rolling")
    db = tmp_path / "db.sqlite"
    server = ServerProcess("--model", str(model_dir), "--db", str(db))
    try:
        config = LoadConfig(clients=16, requests=12, warm_items=9, seed=1)
        result = asyncio.run(run_load(server.url, NUM_ITEMS, config))
    finally:
        assert server.stop() == 0, server.output()
    summary = result.summary()
    print(f"\nload: {summary['requests']} requests, {summary['requests_per_s']:.1f} req/s, "
          f"p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms (client and server share the CPU)")
    assert result.errors == {} and result.ok == result.requests == 16 * 12
    assert len(result.latencies_ms["events"]) > 20 and len(result.latencies_ms["recommend"]) > 20
    assert summary["p99_ms"] >= summary["p50_ms"] > 0 and result.requests_per_s > 0
    for user, items in result.acked.items():
        assert stored_history(db, user) == items, user


async def write_burst(url: str, clients: int, acked: dict, in_flight: dict, stop_after: int, on_count):
    """Clients writing events one request at a time (with request_ids) until the server goes away."""

    async def writer(c: int, client: httpx.AsyncClient) -> None:
        rng = np.random.default_rng(c)
        for n in range(10_000):
            user = f"w{c}-{n % 2}"
            body = {"user": user, "items": rng.integers(0, NUM_ITEMS, int(rng.integers(1, 3))).tolist(),
                    "request_id": f"w{c}-{n}"}  # fmt: skip
            in_flight[c] = body
            try:
                r = await client.post("/v1/events", json=body)
            except httpx.HTTPError:
                return  # the server is gone: this request may or may not have been stored
            if r.status_code != 200:
                raise AssertionError(f"events request answered {r.status_code}: {r.text}")
            in_flight[c] = None
            acked.setdefault(user, []).extend(body["items"])
            on_count()

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(writer(c, client) for c in range(clients)))


def check_stored(db, acked: dict, in_flight: dict) -> None:
    """Each user's stored items are the acknowledged ones, plus at most the one request in flight."""
    for user, items in acked.items():
        stored = stored_history(db, user)
        pending = [b["items"] for b in in_flight.values() if b is not None and b["user"] == user]
        assert stored in [items] + [items + p for p in pending], user


def test_sigkill_mid_burst_then_restart_keeps_every_acknowledged_event(tmp_path):
    from patchrec.persrec.rolling import rolling_fold
    from patchrec.persrec.stored import state_from_bytes
    from patchrec.serve.loading import baseline_scorer

    model_dir = make_baseline(tmp_path, "sasrec-rolling")
    db = tmp_path / "db.sqlite"
    server = ServerProcess("--model", str(model_dir), "--db", str(db), "--batch-window-ms", "2")
    acked: dict[str, list[int]] = {}
    in_flight: dict[int, dict | None] = {}
    count = 0

    def on_count():
        nonlocal count
        count += 1
        if count == 60:
            server.proc.send_signal(signal.SIGKILL)

    asyncio.run(write_burst(server.url, 6, acked, in_flight, 60, on_count))
    assert server.proc.wait(30) == -signal.SIGKILL and count >= 60
    check_stored(db, acked, in_flight)

    restarted = ServerProcess("--model", str(model_dir), "--db", str(db))
    try:
        with httpx.Client(base_url=restarted.url, timeout=30) as client:
            # states left by the killed server: whole rows, consistent with the interactions they cover
            conn = sqlite3.connect(db)
            rows = conn.execute("SELECT user_id, start, end, data FROM states").fetchall()
            conn.close()
            assert rows, "the killed server had stored some states"
            model = baseline_scorer(model_dir).model
            for user, start, end, data in rows:
                state = state_from_bytes(data)
                history = torch.tensor(stored_history(db, user)[start:end])
                with torch.no_grad():
                    rebuilt = rolling_fold(model, None, history, np.array([end - start]))
                torch.testing.assert_close(state.memory, rebuilt.memory, rtol=1e-5, atol=1e-6)
            # every user is served what the model gives for the stored history
            for user in acked:
                history = stored_history(db, user)
                body = {"users": [user], "k": 5, "exclude_seen": False}
                got = client.post("/v1/recommend", json=body).json()
                items, scores = top(expected_scores(model_dir, history), 5)
                assert got["results"][0]["items"] == items
                np.testing.assert_allclose(got["results"][0]["scores"], scores, rtol=1e-5, atol=1e-5)
                assert client.get(f"/v1/users/{user}").json()["length"] == len(history)
            # a retry of the request that was in flight is stored once, whether or not it was before
            for body in (b for b in in_flight.values() if b is not None):
                before = len(stored_history(db, body["user"]))
                ack = client.post("/v1/events", json=body).json()
                added = 0 if ack["replayed"] else len(body["items"])
                assert len(stored_history(db, body["user"])) == before + added
    finally:
        assert restarted.stop() == 0, restarted.output()


def test_sigterm_mid_burst_drains_and_exits_zero(tmp_path):
    model_dir = make_baseline(tmp_path, "sasrec-segments")
    db = tmp_path / "db.sqlite"
    server = ServerProcess("--model", str(model_dir), "--db", str(db), "--batch-window-ms", "20")
    acked: dict[str, list[int]] = {}
    in_flight: dict[int, dict | None] = {}
    count = 0

    def on_count():
        nonlocal count
        count += 1
        if count == 40:
            server.proc.send_signal(signal.SIGTERM)

    asyncio.run(write_burst(server.url, 6, acked, in_flight, 40, on_count))
    assert server.proc.wait(60) == 0, server.output()
    server._reader.join(5)
    assert "stopped by SIGTERM" in server.output()
    check_stored(db, acked, in_flight)
    # nothing was left half-done: the database opens and holds every acknowledged event
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
