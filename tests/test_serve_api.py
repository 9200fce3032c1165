"""``patchrec serve``'s API on every ID model kind (popularity, GRU4Rec, SASRec, HSTU, and PerSRec in the
segments, window and rolling layouts), served on 127.0.0.1: events create users and append, recommendations
equal the model's own scores (the full forward, or ``CachedUser`` fed the same events), users' state sizes,
request_id retries stored once, health, Prometheus metrics and the OpenAPI schema; the SQLite storage on its
own; the command's checks."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import KINDS, NUM_ITEMS, build_app, db_dump, expected_scores, make_baseline, running, top

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

# Three users: a short one, one past the segments' L (24) and one in between; posted in several requests.
EVENTS = {
    "alice": [[3, 7], [1]],
    "bob": [list(range(5, 30)), [2, 9, 9], [40]],
    "carol": [[11, 12, 13, 14, 15, 16, 17], [18], [19, 20]],
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_model_kind_serves_what_the_model_scores(kind, tmp_path):
    model_dir = make_baseline(tmp_path, kind)
    app, service = build_app(model_dir, tmp_path / "db.sqlite", refold_every=3)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for user, requests in EVENTS.items():
            length = 0
            for i, items in enumerate(requests):
                r = client.post("/v1/events", json={"user": user, "items": items})
                assert r.status_code == 200, r.text
                ack = r.json()
                want = {"user": user, "first": length, "count": len(items), "length": length + len(items),
                        "created": i == 0, "replayed": False}  # fmt: skip
                assert ack == want
                length += len(items)
        for user, requests in EVENTS.items():
            history = [i for items in requests for i in items]
            want = expected_scores(model_dir, history, adds=requests, refold_every=3)
            for exclude in (False, True):
                r = client.post("/v1/recommend", json={"users": [user], "k": 7, "exclude_seen": exclude})
                assert r.status_code == 200, r.text
                (got,) = r.json()["results"]
                items, scores = top(want, 7, set(history) if exclude else ())
                assert got["user"] == user and got["items"] == items, (user, exclude)
                np.testing.assert_allclose(got["scores"], scores, rtol=1e-5, atol=1e-5)
                assert not exclude or not set(got["items"]) & set(history)
            # an inline history scores like a stored user with no state kept (window: a fresh state)
            r = client.post("/v1/recommend", json={"history": history, "k": 5, "exclude_seen": False})
            inline = expected_scores(model_dir, history, refold_every=1)
            (got,) = r.json()["results"]
            assert got["items"] == top(inline, 5)[0] and got["user"] is None
            info = client.get(f"/v1/users/{user}").json()
            assert info["user"] == user and info["length"] == len(history)
            if service.scorer.stateful:
                # a user with at most one segment has folded nothing yet (segments: no rows)
                assert info["state"]["current"] and (info["state"]["tensor_bytes"] > 0 or len(history) <= 4)
            else:
                assert info["state"] is None
        # several users in one request, in the order asked (a user twice is answered twice)
        r = client.post("/v1/recommend", json={"users": ["carol", "alice", "carol"], "k": 3})
        assert [x["user"] for x in r.json()["results"]] == ["carol", "alice", "carol"]
        assert client.get("/v1/users/bob", params={"history": "true"}).json()["history"] == [
            i for items in EVENTS["bob"] for i in items
        ]
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["model"]["kind"] == kind.split("-")[0]
        assert health["model"]["num_items"] == NUM_ITEMS


def test_persrec_states_are_stored_per_layout(tmp_path):
    """Rolling: the state covers the folded segments and stays k x d; the stored state is used and kept up to
    date by events (fold when a segment completes), rebuilt when it was made by another model."""
    from patchrec.serve.storage import SQLiteStorage

    model_dir = make_baseline(tmp_path, "sasrec-rolling")
    db = tmp_path / "db.sqlite"
    app, _ = build_app(model_dir, db)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        sizes = []
        for n in range(1, 15):
            client.post("/v1/events", json={"user": "u", "items": [n]})
            client.post("/v1/recommend", json={"users": ["u"], "k": 2})  # waits for the events' batch upkeep
            state = client.get("/v1/users/u").json()["state"]
            assert state["covered_items"] == (n - 1) // 4 * 4
            sizes.append(state["tensor_bytes"])
        assert len(set(sizes)) == 1  # a bounded state: k memory vectors whatever the history length
        storage = SQLiteStorage(db)
        row = storage.states(["u"])["u"]
        storage.close()
    # another model (other weights) on the same database: the state is rebuilt, never read
    other = make_baseline(tmp_path / "other", "sasrec-rolling", seed=5)
    app, _ = build_app(other, db)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/users/u").json()["state"]["current"] is False
        got = client.post("/v1/recommend", json={"users": ["u"], "k": 4, "exclude_seen": False}).json()
        want = expected_scores(other, list(range(1, 15)))
        assert got["results"][0]["items"] == top(want, 4)[0]
        assert client.get("/v1/users/u").json()["state"]["current"] is True
    storage = SQLiteStorage(db)
    assert storage.states(["u"])["u"].fingerprint != row.fingerprint
    storage.close()


def test_request_id_retries_are_stored_once(tmp_path):
    model_dir = make_baseline(tmp_path, "sasrec")
    db = tmp_path / "db.sqlite"
    app, _ = build_app(model_dir, db)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        first = client.post("/v1/events", json={"user": "u", "items": [1, 2], "request_id": "r1"}).json()
        again = client.post("/v1/events", json={"user": "u", "items": [1, 2], "request_id": "r1"}).json()
        assert first["count"] == 2 and not first["replayed"]
        assert again == {**first, "count": 2, "created": False, "replayed": True}
        before = db_dump(db)
        clash = client.post("/v1/events", json={"user": "v", "items": [1, 2], "request_id": "r1"})
        assert clash.status_code == 409 and clash.json()["field"] == "request_id"
        assert db_dump(db) == before
        assert client.get("/v1/users/u").json()["length"] == 2


def test_metrics_and_openapi(tmp_path):
    model_dir = make_baseline(tmp_path, "sasrec-segments")
    app, _ = build_app(model_dir, tmp_path / "db.sqlite")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.post("/v1/events", json={"user": "u", "items": [1, 2, 3]})
        client.post("/v1/recommend", json={"users": ["u"]})
        client.post("/v1/recommend", json={"users": ["nobody"]})
        text = client.get("/metrics").text
        schema = client.get("/openapi.json").json()
    assert 'patchrec_requests_total{code="200",route="/v1/events"} 1.0' in text
    assert 'patchrec_request_errors_total{code="404",route="/v1/recommend"} 1.0' in text
    assert 'patchrec_request_latency_seconds_count{route="/v1/recommend"} 2.0' in text
    assert "patchrec_batch_requests_bucket" in text and "patchrec_events_stored_total 3.0" in text
    paths = {"/v1/events", "/v1/recommend", "/v1/users/{user_id}", "/healthz", "/metrics"}
    assert paths <= set(schema["paths"])
    body = schema["components"]["schemas"]["RecommendIn"]["properties"]
    assert {"users", "history", "k", "exclude_seen"} <= set(body)


def test_storage_appends_in_one_transaction_and_keeps_states(tmp_path):
    from patchrec.serve.storage import EventWrite, SQLiteStorage, StateRow

    storage = SQLiteStorage(tmp_path / "db.sqlite")
    assert storage.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    acks = storage.append([EventWrite("a", (1, 2)), EventWrite("b", (3,)), EventWrite("a", (4,), "x")])
    assert [(a.user, a.first, a.count, a.length, a.created) for a in acks] == [
        ("a", 0, 2, 2, True), ("b", 0, 1, 1, True), ("a", 2, 1, 3, False)]  # fmt: skip
    got = storage.histories(["a", "b", "zz"])
    assert set(got) == {"a", "b"} and got["a"].tolist() == [1, 2, 4] and got["b"].tolist() == [3]
    assert storage.lengths(["a", "zz"]) == {"a": 3} and storage.max_item() == 4
    # a failing statement rolls back the whole batch: nothing of it is stored
    with pytest.raises(Exception):  # noqa: B017 - sqlite3 raises its own error type for the bad value
        storage.append([EventWrite("c", (5,)), EventWrite("d", (object(),))])
    assert storage.lengths(["c", "d"]) == {} and storage.counts() == (2, 4)
    row = StateRow("fp", 0, 4, 4, "h", 10, b"bytes")
    storage.save_states({"a": row})
    assert storage.states(["a", "b"]) == {"a": row}
    assert storage.state_info("a") == ("fp", 10, 5, 4)
    storage.close()
    reopened = SQLiteStorage(tmp_path / "db.sqlite")
    assert reopened.lengths(["a", "b"]) == {"a": 3, "b": 1}
    reopened.close()


def test_serve_command_refuses_bad_setups(tmp_path, capsys):
    from patchrec.cli import main
    from patchrec.serve.config import ServeConfig

    model_dir = make_baseline(tmp_path, "sasrec")
    with pytest.raises(ValueError, match="--token-file"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="127.0.0.5").host == "127.0.0.5" and ServeConfig(host="::1")
    assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"]) == 2
    assert "needs --token-file" in capsys.readouterr().err
    short = tmp_path / "token"
    short.write_text("abc\n")
    assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--token-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--ranking", "beam"]) == 2
    assert "apply to LLM models" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    # a database filled for a larger catalog is refused before serving
    from patchrec.serve.storage import EventWrite, SQLiteStorage

    db = tmp_path / "big.sqlite"
    storage = SQLiteStorage(db)
    storage.append([EventWrite("u", (NUM_ITEMS + 3,))])
    storage.close()
    assert main(["serve", "--model", str(model_dir), "--db", str(db)]) == 2
    assert f"holds item id {NUM_ITEMS + 3}" in capsys.readouterr().err
