"""Plain ASGI middleware of ``patchrec serve``, outermost first: metrics (every request timed and counted by
route and status), bearer-token authentication, the request-body limit, and bodies read as JSON. Their own
answers are one-line JSON errors like the API's."""

from __future__ import annotations

import hmac
import json
import time

from starlette.exceptions import HTTPException

from patchrec.serve.metrics import ServeMetrics


async def send_json(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, field: str | None) -> dict:
    """The API's error object: one line naming the field (when there is one) first."""
    line = (f"{field}: {message}" if field else message).replace("\n", " ")
    return {"error": line, "field": field}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimit:
    """413 for a body over ``limit`` bytes: at once from Content-Length, else while it streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_json(send, 413, error_body(f"larger than {self.limit} bytes", "body"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)  # FastAPI answers it as an HTTPException (413)
            return message

        await self.app(scope, limited, send)


class JsonBody:
    """Every request body is read as JSON whatever its Content-Type says (``curl -d`` sends a form type), so
    that a client gets the JSON parser's error for a bad body, not a confusing one about form data."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            # in place: the outer middleware reads scope["route"] from this same dict afterwards
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        await self.app(scope, receive, send)


class BearerAuth:
    """Every request must carry ``Authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.expected = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.expected is None:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            return await send_json(send, 401, error_body("a valid bearer token is required", "authorization"),
                                   {"WWW-Authenticate": "Bearer"})  # fmt: skip
        await self.app(scope, receive, send)


class RequestMetrics:
    """Counts and times every HTTP request by route template (``/v1/users/{user_id}``) and status; also
    keeps ``in_flight``, the ``/v1/`` requests being handled now (the batcher's cue to wait for more)."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        api = scope["path"].startswith("/v1/")
        self.in_flight += api

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.in_flight -= api
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, status, time.perf_counter() - start)


__all__ = ["BearerAuth", "BodyLimit", "BodyTooLarge", "JsonBody", "RequestMetrics", "error_body", "send_json"]
