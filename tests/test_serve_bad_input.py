"""Bad input to ``patchrec serve``: every malformed, mistyped, out-of-range or oversized request gets a 4xx
with one line of JSON naming the field, the database is unchanged, and the server keeps answering; the bearer
token is required on every request when one is set."""

from __future__ import annotations

import json

import pytest
from serve_helpers import NUM_ITEMS, build_app, db_dump, make_baseline, running

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

LIMITS = dict(max_k=20, max_history=30, max_event_items=8, max_users=3, max_body_bytes=2000)
OK_EVENT = {"user": "u", "items": [1, 2]}

EVENTS = [
    ('{"user": "u", "items": [1,', 400, "body"),
    ("[1, 2]", 422, "body"),
    ("", 422, "body"),
    ('"u"', 422, "body"),
    ({"items": [1]}, 422, "user"),
    ({"user": 123, "items": [1]}, 422, "user"),
    ({"user": "", "items": [1]}, 422, "user"),
    ({"user": "x" * 129, "items": [1]}, 422, "user"),
    ({"user": "a\nb", "items": [1]}, 422, "user"),
    ({"user": "u"}, 422, "items"),
    ({"user": "u", "items": "1,2"}, 422, "items"),
    ({"user": "u", "items": []}, 422, "items"),
    ({"user": "u", "items": [1, "2"]}, 422, "items[1]"),
    ({"user": "u", "items": [1.0]}, 422, "items[0]"),
    ({"user": "u", "items": [True]}, 422, "items[0]"),
    ({"user": "u", "items": [None]}, 422, "items[0]"),
    ({"user": "u", "items": [3, -1]}, 422, "items[1]"),
    ({"user": "u", "items": [NUM_ITEMS]}, 422, "items[0]"),
    ({"user": "u", "items": [10**30]}, 422, "items[0]"),
    ({"user": "u", "items": list(range(9))}, 422, "items"),
    ({"user": "u", "items": [1], "extra": 1}, 422, "extra"),
    ({"user": "u", "items": [1], "request_id": 7}, 422, "request_id"),
]
RECOMMEND = [
    ('{"users": ["u"', 400, "body"),
    ({}, 422, "users"),
    ({"k": 3}, 422, "users"),
    ({"users": ["u"], "history": [1]}, 422, "users"),
    ({"users": []}, 422, "users"),
    ({"users": "u"}, 422, "users"),
    ({"users": [1]}, 422, "users[0]"),
    ({"users": ["nobody"]}, 404, "users[0]"),
    ({"users": ["u", "nobody"]}, 404, "users[1]"),
    ({"users": ["u", "u", "u", "u"]}, 422, "users"),
    ({"history": []}, 422, "history"),
    ({"history": list(range(31))}, 422, "history"),
    ({"history": [1, 2, NUM_ITEMS + 5]}, 422, "history[2]"),
    ({"history": [1, "x"]}, 422, "history[1]"),
    ({"users": ["u"], "k": 0}, 422, "k"),
    ({"users": ["u"], "k": 21}, 422, "k"),
    ({"users": ["u"], "k": "5"}, 422, "k"),
    ({"users": ["u"], "k": 5.5}, 422, "k"),
    ({"users": ["u"], "k": True}, 422, "k"),
    ({"users": ["u"], "k": None}, 422, "k"),
    ({"users": ["u"], "exclude_seen": "yes"}, 422, "exclude_seen"),
    ({"users": ["u"], "exclude_seen": 1}, 422, "exclude_seen"),
]


def check_error(response, status: int, field: str | None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert "\n" not in response.text.strip()
    body = response.json()
    assert set(body) == {"error", "field"} and body["field"] == field, body
    assert body["error"].startswith(f"{field}: " if field else "") and body["error"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model_dir = make_baseline(root, "sasrec-rolling")
    db = root / "db.sqlite"
    app, _ = build_app(model_dir, db, **LIMITS)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/events", json=OK_EVENT).status_code == 200
        assert client.post("/v1/recommend", json={"users": ["u"]}).status_code == 200  # state upkeep done
        yield client, db


def send(client, path: str, body):
    content = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, cases", [("/v1/events", EVENTS), ("/v1/recommend", RECOMMEND)])
def test_bad_requests_are_4xx_naming_the_field_and_change_nothing(server, path, cases):
    client, db = server
    before = db_dump(db)
    for body, status, field in cases:
        check_error(send(client, path, body), status, field)
    assert db_dump(db) == before
    # still serving, and a form-encoded body (curl -d) is read as JSON too
    r = client.post("/v1/recommend", content=json.dumps({"users": ["u"], "k": 2}),
                    headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 200 and len(r.json()["results"][0]["items"]) == 2


def test_oversized_bodies_other_routes_and_methods(server):
    client, db = server
    before = db_dump(db)
    big = json.dumps({"user": "u", "items": [1] * 1500})
    check_error(client.post("/v1/events", content=big), 413, "body")

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for i in range(0, len(big), 500):
            yield big[i : i + 500].encode()

    check_error(client.post("/v1/events", content=chunks()), 413, "body")
    check_error(client.get("/v1/users/nobody"), 404, "user_id")
    check_error(client.get("/v1/users/" + "x" * 129), 422, "user_id")
    check_error(client.get("/v1/users/u", params={"history": "maybe"}), 422, "history")
    check_error(client.get("/nowhere"), 404, None)
    check_error(client.get("/v1/events"), 405, None)
    assert db_dump(db) == before
    assert client.get("/v1/users/u").json()["length"] == 2


def test_the_bearer_token_is_checked_on_every_request(tmp_path):
    model_dir = make_baseline(tmp_path, "popularity")
    token = "s3cret-token-0123456789"
    app, _ = build_app(model_dir, tmp_path / "db.sqlite", token=token)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/healthz", "/metrics", "/v1/users/u", "/openapi.json"):
            check_error(client.get(path), 401, "authorization")
            check_error(client.get(path, headers={"authorization": f"Bearer {token}x"}), 401, "authorization")
            check_error(client.get(path, headers={"authorization": token}), 401, "authorization")
        r = client.post("/v1/events", json=OK_EVENT)
        check_error(r, 401, "authorization")
        assert r.headers["www-authenticate"] == "Bearer"
        good = {"authorization": f"Bearer {token}"}
        assert client.post("/v1/events", json=OK_EVENT, headers=good).status_code == 200
        assert client.get("/v1/users/u", headers=good).json()["length"] == 2
