"""Dynamic batching in ``patchrec serve``: concurrent requests run in shared batches and get what each gets
alone (same top-k, scores within 1e-5), for stateless models and PerSRec states built, folded and read in
batches; a request that fails inside the model fails alone; a full queue answers 503 with Retry-After; a
request past its timeout answers 504 and, if it never started, stores nothing."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
from serve_helpers import build_app, make_baseline, running

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")

RNG = np.random.default_rng(3)
# per user: the event requests that build their history (lengths around the segment, L and P + R)
USERS = {f"u{i}": [RNG.integers(0, 41, size=int(n)).tolist() for n in RNG.integers(1, 9, size=int(r))]
         for i, r in enumerate(RNG.integers(1, 6, size=10))}  # fmt: skip
INLINE = [RNG.integers(0, 41, size=int(n)).tolist() for n in (1, 3, 9, 17, 30)]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def load_users(client, concurrent: bool) -> None:
    async def one(user, requests):
        for items in requests:  # one user's events stay in order
            r = await client.post("/v1/events", json={"user": user, "items": items})
            assert r.status_code == 200, r.text

    if concurrent:
        await asyncio.gather(*(one(u, reqs) for u, reqs in USERS.items()))
    else:
        for u, reqs in USERS.items():
            await one(u, reqs)


async def ask_all(client, concurrent: bool) -> list[dict]:
    bodies = [{"users": [u], "k": 6, "exclude_seen": False} for u in USERS]
    bodies += [{"history": h, "k": 6, "exclude_seen": True} for h in INLINE]
    bodies.append({"users": list(USERS)[:3], "k": 4})
    if concurrent:
        responses = await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in bodies))
    else:
        responses = [await client.post("/v1/recommend", json=b) for b in bodies]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()["results"] for r in responses]


def serve_and_ask(model_dir, db, concurrent: bool, **config):
    app, _ = build_app(model_dir, db, refold_every=3, **config)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await load_users(client, concurrent)
            results = await ask_all(client, concurrent)
            return results, (await client.get("/metrics")).text

    with running(app) as url:
        return asyncio.run(go(url))


@pytest.mark.parametrize("kind", ["sasrec-rolling", "hstu-window", "sasrec-segments", "hstu", "gru4rec"])
def test_batched_results_equal_each_request_alone(kind, tmp_path):
    model_dir = make_baseline(tmp_path, kind)
    alone, text_alone = serve_and_ask(model_dir, tmp_path / "alone.sqlite", False, batch_requests=1)
    batched, text = serve_and_ask(model_dir, tmp_path / "batched.sqlite", True, batch_window_ms=50)
    # batching off: every batch held one request; on: some held several
    assert metric(text_alone, 'patchrec_batch_requests_bucket{le="1.0"}') == metric(
        text_alone, "patchrec_batch_requests_count")
    single = metric(text, 'patchrec_batch_requests_bucket{le="1.0"}')
    several = metric(text, "patchrec_batch_requests_count") - single
    assert several >= 1
    for a, b in zip(alone, batched, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x["user"] == y["user"] and x["items"] == y["items"]
            np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-5, atol=1e-5)


POISON = 40  # an item id no good request uses
SLOW = 39  # a request with it keeps the worker busy for a while, so that the next requests queue up


def poisoned(fn):
    def wrapper(items, *args, **kwargs):
        if bool((items == POISON).any()):
            raise RuntimeError("injected failure")
        if bool((items == SLOW).any()):
            time.sleep(1.0)
        return fn(items, *args, **kwargs)

    return wrapper


def test_a_request_failing_inside_the_model_fails_alone(tmp_path):
    from patchrec.serve.loading import baseline_scorer

    model_dir = make_baseline(tmp_path, "sasrec-rolling")
    scorer = baseline_scorer(model_dir)
    scorer.model.embed_rows = poisoned(scorer.model.embed_rows)
    app, service = build_app(model_dir, tmp_path / "db.sqlite", scorer=scorer, batch_window_ms=300)
    reference, _ = build_app(model_dir, tmp_path / "ref.sqlite")
    good = [[1, 2, 3], [5] * 9, [7, 8], [9, 10, 11, 12, 13]]

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            # events: the poisoned user's state upkeep fails, the others' states are kept up to date
            bodies = [{"user": f"g{i}", "items": h} for i, h in enumerate(good)]
            bodies.append({"user": "bad", "items": [1, POISON, 3, 4, 5, 6]})  # POISON in a folded segment
            events = await asyncio.gather(*(client.post("/v1/events", json=b) for b in bodies))
            assert [r.status_code for r in events] == [200] * 5  # acknowledged: stored before any model work
            before = (await client.get("/metrics")).text
            asks = [{"history": h, "k": 5} for h in good] + [{"history": [1, POISON, 2], "k": 5}]
            asks += [{"users": ["g0", "g1"], "k": 5}, {"users": ["bad"], "k": 5}]
            blocker = asyncio.ensure_future(client.post("/v1/recommend", json={"history": [SLOW], "k": 1}))
            await asyncio.sleep(0.3)  # the worker is busy with it: the seven below queue up behind it
            answers = await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in asks))
            assert (await blocker).status_code == 200
            after = (await client.get("/metrics")).text
            states = [(await client.get(f"/v1/users/g{i}")).json()["state"] for i in range(4)]
            pairs = [(r.status_code, r.json()) for r in answers]
            return [(r.status_code, r.json()) for r in events], pairs, before, after, states

    with running(app) as url:
        events, answers, before, after, states = asyncio.run(go(url))
    codes = [code for code, _ in answers]
    assert codes == [200, 200, 200, 200, 500, 200, 500]
    for code, body in answers:
        if code == 500:
            assert "\n" not in body["error"] and "injected failure" in body["error"]
    # the seven were one batch (after the blocker's)
    batches = metric(after, "patchrec_batch_requests_count") - metric(before, "patchrec_batch_requests_count")
    size = metric(after, "patchrec_batch_requests_sum") - metric(before, "patchrec_batch_requests_sum")
    assert (batches, size) == (2, 8)
    assert metric(after, "patchrec_state_update_failures_total") >= 1 and service.state_failures >= 1
    assert all(s is not None and s["current"] for s in states)
    # the good answers are what the same requests get from a healthy model
    with running(reference) as url, httpx.Client(base_url=url, timeout=60) as client:
        for i, h in enumerate(good):
            client.post("/v1/events", json={"user": f"g{i}", "items": h})
        asked = [{"history": h, "k": 5} for h in good] + [None, {"users": ["g0", "g1"], "k": 5}, None]
        for (_, body), ask in zip(answers, asked, strict=True):
            if ask is not None:
                assert client.post("/v1/recommend", json=ask).json() == body


def slow(fn, seconds: float):
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapper


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    from patchrec.serve.loading import baseline_scorer

    model_dir = make_baseline(tmp_path, "sasrec")
    scorer = baseline_scorer(model_dir)
    scorer.model.forward = slow(scorer.model.forward, 0.3)
    app, _ = build_app(model_dir, tmp_path / "db.sqlite", scorer=scorer, queue_size=2, batch_requests=1,
                       batch_window_ms=0)  # fmt: skip

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answers = await asyncio.gather(*(client.post("/v1/recommend", json={"history": [1, i], "k": 3})
                                             for i in range(10)))  # fmt: skip
            return answers, (await client.get("/metrics")).text

    with running(app) as url:
        answers, text = asyncio.run(go(url))
    busy = [r for r in answers if r.status_code == 503]
    assert len(busy) >= 1 and sum(r.status_code == 200 for r in answers) + len(busy) == 10
    assert sum(r.status_code == 200 for r in answers) >= 2  # the queue's two places, at least
    for r in busy:
        assert r.headers["retry-after"] == "1" and r.json()["error"].startswith("server busy")
    assert metric(text, "patchrec_rejected_total") == len(busy)


def test_a_request_past_its_timeout_answers_504_and_never_starts(tmp_path):
    from patchrec.serve.loading import baseline_scorer

    model_dir = make_baseline(tmp_path, "sasrec")
    scorer = baseline_scorer(model_dir)
    scorer.model.forward = slow(scorer.model.forward, 1.0)
    app, _ = build_app(model_dir, tmp_path / "db.sqlite", scorer=scorer, timeout_s=0.4, batch_requests=1,
                       batch_window_ms=0)  # fmt: skip

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.ensure_future(client.post("/v1/recommend", json={"history": [1], "k": 3}))
            await asyncio.sleep(0.1)  # the worker is busy with it for 1 s
            late = await client.post("/v1/events", json={"user": "late", "items": [2]})
            slow_answer = await first
            await asyncio.sleep(1.2)  # the worker has moved past the abandoned events request
            return slow_answer, late, await client.get("/v1/users/late")

    with running(app) as url:
        slow_answer, late, user = asyncio.run(go(url))
    assert slow_answer.status_code == 504 and late.status_code == 504
    assert "request_id" in late.json()["error"]
    assert user.status_code == 404  # the abandoned events request was dropped before it started


def test_a_bug_outside_the_model_answers_500_and_the_server_goes_on(tmp_path):
    model_dir = make_baseline(tmp_path, "sasrec")
    app, service = build_app(model_dir, tmp_path / "db.sqlite")
    good = service.recommend
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        service.recommend = lambda requests: 1 / 0
        r = client.post("/v1/recommend", json={"history": [1, 2], "k": 3})
        assert r.status_code == 500 and "\n" not in r.text
        assert r.json() == {"error": "internal error: ZeroDivisionError: division by zero", "field": None}
        service.recommend = good
        assert client.post("/v1/recommend", json={"history": [1, 2], "k": 3}).status_code == 200
