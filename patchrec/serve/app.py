"""The HTTP API of ``patchrec serve`` (FastAPI; OpenAPI schema at ``/openapi.json``; docs/serve.md):

- ``POST /v1/events`` ``{"user": "u1", "items": [3, 17], "request_id": "optional"}``: append interactions
  (oldest first; the first event creates the user), acknowledged once committed;
- ``POST /v1/recommend`` ``{"users": ["u1"]}`` or ``{"history": [3, 17]}``, with ``k`` and ``exclude_seen``;
- ``GET /v1/users/{user_id}``: history length and stored state size;
- ``GET /healthz``, ``GET /metrics`` (Prometheus text).

Events and recommendations go through one queue to one worker thread that owns the model and the database
(``patchrec.serve.batcher``, ``patchrec.serve.service``); the request handlers only validate, look up
users, and wait. Every error is one line of JSON, ``{"error": "<field>: <what is wrong>", "field": ...}``,
with a 4xx code for bad input (nothing is stored then) and 5xx for the server's own failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchrec.serve.batcher import Batcher, Job, QueueFull
from patchrec.serve.config import ServeConfig
from patchrec.serve.metrics import ServeMetrics
from patchrec.serve.middleware import BearerAuth, BodyLimit, JsonBody, RequestMetrics, error_body
from patchrec.serve.service import ModelError, RecommendRequest, Service, UnknownUser
from patchrec.serve.storage import Ack, EventWrite, RequestIdConflict

log = logging.getLogger("patchrec.serve")

UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: UserId = Field(description="user id (1-128 characters); the first event creates the user")
    items: list[int] = Field(description="item ids (the catalog's 0..N-1), oldest first", min_length=1)
    request_id: UserId | None = Field(None, description="optional id: a retry with it is stored only once")


class EventsOut(BaseModel):
    user: str
    first: int = Field(description="position of the first item in the user's history")
    count: int = Field(description="items appended (0 for a replayed request_id)")
    length: int = Field(description="the user's history length after this request")
    created: bool
    replayed: bool


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    users: list[UserId] | None = Field(None, description="stored users to recommend for", min_length=1)
    history: list[int] | None = Field(None, description="or an inline history, oldest first (nothing stored)")
    k: int = Field(10, description="items per user")
    exclude_seen: bool = Field(True, description="leave out items already in the history")


class RecommendationOut(BaseModel):
    user: str | None
    items: list[int]
    scores: list[float]
    titles: list[str] | None = None


class RecommendOut(BaseModel):
    results: list[RecommendationOut]


class StateOut(BaseModel):
    tensor_bytes: int
    stored_bytes: int
    covered_items: int
    current: bool = Field(description="made by the model being served (else rebuilt on the next request)")


class UserOut(BaseModel):
    user: str
    length: int
    state: StateOut | None
    history: list[int] | None = None


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def _loc(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _check_items(items: list[int], field: str, num_items: int) -> None:
    bad = next((i for i, v in enumerate(items) if not 0 <= v < num_items), None)
    if bad is not None:
        raise ApiError(422, f"{field}[{bad}]",
                       f"unknown item id {items[bad]} (the catalog is 0..{num_items - 1})")  # fmt: skip


def create_app(service: Service, config: ServeConfig, reader, *, token: str | None = None,
               on_ready: Callable[[], None] | None = None, metrics: ServeMetrics | None = None):  # fmt: skip
    """The ASGI application: the API wrapped in metrics, authentication and the body limit. ``reader`` is a
    storage handle for the handlers' look-ups (another connection than the worker's)."""
    metrics = metrics or ServeMetrics()
    scorer = service.scorer
    max_k = min(config.max_k, getattr(scorer, "max_k", scorer.num_items), scorer.num_items)
    runtime: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        executor = ThreadPoolExecutor(1, thread_name_prefix="patchrec-worker")
        batcher = Batcher(
            lambda jobs: _handle(service, metrics, jobs, executor), window_s=config.batch_window_ms / 1000,
            max_rows=config.batch_rows, max_jobs=config.batch_requests, queue_size=config.queue_size,
            on_depth=metrics.queue_depth.set, active=lambda: wrapped.in_flight,
        )  # fmt: skip
        runtime.update(batcher=batcher, executor=executor)
        batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.stop()  # every queued request is answered first
            executor.shutdown(wait=True)

    async def run(job: Job):
        try:
            runtime["batcher"].submit(job)
        except QueueFull:
            metrics.rejected.inc()
            raise ApiError(503, None, f"server busy: {config.queue_size} requests are already waiting",
                           {"Retry-After": "1"}) from None  # fmt: skip
        try:
            out = await asyncio.wait_for(job.future, config.timeout_s)
        except TimeoutError:
            metrics.timeouts.inc()
            raise ApiError(504, None, f"no answer within {config.timeout_s:g} s (an events request may still "
                           "have been stored: retry it with the same request_id)") from None
        if isinstance(out, (ApiError, UnknownUser, ModelError, RequestIdConflict)):
            raise out
        if isinstance(out, Exception):
            # answered here, not by the server's last-resort handler (which also closes the connection)
            raise ApiError(500, None, f"internal error: {type(out).__name__}: {out}")
        return out

    app = FastAPI(title="patchrec serve", version="1", lifespan=lifespan,
                  description="Online recommendation with dynamic packed batching.")  # fmt: skip
    _add_error_handlers(app)
    _add_request_routes(app, config, scorer, reader, run, max_k)
    _add_read_routes(app, scorer, reader, runtime, metrics)
    wrapped = RequestMetrics(BearerAuth(BodyLimit(JsonBody(app), config.max_body_bytes), token), metrics)
    wrapped.fastapi = app  # for tests and the server (lifespan, state)
    return wrapped


async def _handle(service: Service, metrics: ServeMetrics, jobs: list[Job], executor) -> None:
    """One batch of jobs, the work on the worker thread (``executor``): the events stored, the
    recommendations scored, then the stateful scorers' states brought up to date for the users with events."""
    scorer = service.scorer
    loop = asyncio.get_running_loop()
    start = loop.time()
    events = [j for j in jobs if j.kind == "events"]
    recs = [j for j in jobs if j.kind == "recommend"]
    metrics.batch_requests.observe(len(jobs))
    failures = service.state_failures
    if events:
        try:
            acks = await loop.run_in_executor(executor, service.append, [j.payload for j in events])
        except Exception as err:
            log.exception("storing events failed")
            failed = ApiError(503, None, f"storing the events failed: {type(err).__name__}: {err}")
            acks = [failed] * len(events)
        for job, ack in zip(events, acks, strict=True):
            _settle(job.future, ack)
        metrics.events.inc(sum(a.count for a in acks if isinstance(a, Ack)))
    if recs:
        metrics.batch_rows.observe(sum(j.rows for j in recs))
        outs = await loop.run_in_executor(executor, service.recommend, [j.payload for j in recs])
        for job, out in zip(recs, outs, strict=True):
            _settle(job.future, out)
    if events and scorer.stateful:
        users = list(dict.fromkeys(a.user for a in acks if isinstance(a, Ack) and a.count))
        await loop.run_in_executor(executor, service.maintain, users)
    metrics.state_failures.inc(service.state_failures - failures)
    metrics.batch_seconds.observe(loop.time() - start)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as the API's JSON body (``error_body``) with its status."""
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.field), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = list(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(error_body(f"malformed JSON ({reason} at character {loc[-1]})", "body"), 400)
        field = _loc(loc[1:]) if loc and loc[0] == "body" else _loc(loc[1:] or loc)
        message = first.get("msg", "invalid")
        if loc == ["body"] and first.get("type") == "missing":
            message = "a JSON object is required"
        return JSONResponse(error_body(message, field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        field = "body" if exc.status_code == 413 else None
        return JSONResponse(error_body(str(exc.detail), field), exc.status_code, headers=exc.headers)

    @app.exception_handler(UnknownUser)
    async def unknown_user(request, exc: UnknownUser):
        return JSONResponse(error_body(str(exc), "users"), 404)

    @app.exception_handler(ModelError)
    async def model_error(request, exc: ModelError):
        return JSONResponse(error_body(str(exc), None), 500)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", None), 500)

    @app.exception_handler(RequestIdConflict)
    async def conflict(request, exc: RequestIdConflict):
        return JSONResponse(error_body(str(exc), "request_id"), 409)


def _add_request_routes(app: FastAPI, config: ServeConfig, scorer, reader, run, max_k: int) -> None:
    """The two routes that go through the batcher (``run``): events and recommendations."""
    @app.post("/v1/events", response_model=EventsOut, summary="append a user's interactions")
    async def events(body: EventsIn) -> EventsOut:
        if len(body.items) > config.max_event_items:
            raise ApiError(422, "items",
                           f"{len(body.items)} items, more than {config.max_event_items} in one request")
        _check_items(body.items, "items", scorer.num_items)
        future = asyncio.get_running_loop().create_future()
        ack = await run(Job("events", EventWrite(body.user, tuple(body.items), body.request_id), 0, future))
        return EventsOut(user=ack.user, first=ack.first, count=ack.count, length=ack.length,
                         created=ack.created, replayed=ack.replayed)  # fmt: skip

    @app.post("/v1/recommend", response_model=RecommendOut,
              summary="top-k items for stored users or an inline history")  # fmt: skip
    async def recommend(body: RecommendIn) -> RecommendOut:
        if (body.users is None) == (body.history is None):
            raise ApiError(422, "users", "give exactly one of 'users' (stored users) and 'history' (inline)")
        if not 1 <= body.k <= max_k:
            raise ApiError(422, "k", f"must be in [1, {max_k}], got {body.k}")
        if body.users is not None:
            if len(body.users) > config.max_users:
                raise ApiError(422, "users",
                               f"{len(body.users)} users, more than {config.max_users} in one request")
            lengths = reader.lengths(body.users)
            for i, user in enumerate(body.users):
                if user not in lengths:
                    raise ApiError(404, f"users[{i}]", f"unknown user {user!r} (post events for it first)")
            rows = sum(scorer.rows(lengths[u]) for u in dict.fromkeys(body.users))
        else:
            if not body.history:
                raise ApiError(422, "history", "empty: give at least one item")
            if len(body.history) > config.max_history:
                raise ApiError(422, "history",
                               f"{len(body.history)} items, more than the limit {config.max_history}")
            _check_items(body.history, "history", scorer.num_items)
            rows = scorer.rows(len(body.history))
        request = RecommendRequest(tuple(body.users) if body.users else None,
                                   tuple(body.history) if body.history else None, body.k, body.exclude_seen)
        future = asyncio.get_running_loop().create_future()
        results = await run(Job("recommend", request, rows, future))
        titles = scorer.titles
        return RecommendOut(results=[
            RecommendationOut(user=r.user, items=r.items, scores=r.scores,
                              titles=[titles[i] for i in r.items] if titles is not None else None)
            for r in results
        ])  # fmt: skip


def _add_read_routes(app: FastAPI, scorer, reader, runtime: dict, metrics: ServeMetrics) -> None:
    """The routes that only read: a user's record, liveness and the Prometheus metrics."""
    @app.get("/v1/users/{user_id}", response_model=UserOut,
             summary="a user's history length and stored state")  # fmt: skip
    async def user(user_id: Annotated[UserId, Path()],
                   history: Annotated[bool, Query(description="also return the items")] = False) -> UserOut:
        length = reader.lengths([user_id]).get(user_id)
        if length is None:
            raise ApiError(404, "user_id", f"unknown user {user_id!r}")
        info = reader.state_info(user_id) if scorer.stateful else None
        state = None
        if info is not None:
            state = StateOut(tensor_bytes=info[1], stored_bytes=info[2], covered_items=info[3],
                             current=info[0] == scorer.fingerprint)  # fmt: skip
        items = reader.histories([user_id])[user_id].tolist() if history else None
        return UserOut(user=user_id, length=length, state=state, history=items)

    @app.get("/healthz", summary="liveness and the model served")
    async def healthz() -> dict:
        batcher = runtime.get("batcher")
        return {"status": "ok", "model": scorer.describe(), "fingerprint": scorer.fingerprint,
                "queue": batcher.queue.qsize() if batcher else 0}  # fmt: skip

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _settle(future: asyncio.Future, outcome) -> None:
    """Hand a result or an exception to the waiting handler (an exception as a value: the handler raises
    it, so it is never left unretrieved); nothing when the handler has given up (timeout)."""
    if not future.done():
        future.set_result(outcome)


__all__ = ["create_app"]
