"""Prometheus metrics of ``patchrec serve`` (``GET /metrics``), in a registry of their own per server so that
several servers in one process (tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROW_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("patchrec_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)  # fmt: skip
        self.errors = Counter("patchrec_request_errors", "HTTP requests answered with a 4xx or 5xx code",
                              ["route", "code"], registry=r)  # fmt: skip
        self.latency = Histogram("patchrec_request_latency_seconds", "time from request to response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_requests = Histogram("patchrec_batch_requests", "requests run together in one batch",
                                        buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_rows = Histogram("patchrec_batch_rows", "history rows of the recommendations of a batch",
                                    buckets=ROW_BUCKETS, registry=r)  # fmt: skip
        self.batch_seconds = Histogram("patchrec_batch_seconds", "worker time of one batch",
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("patchrec_queue_depth", "requests waiting for the worker", registry=r)
        self.rejected = Counter("patchrec_rejected", "requests refused because the queue was full",
                                registry=r)  # fmt: skip
        self.timeouts = Counter("patchrec_timeouts", "requests that ran past the per-request timeout",
                                registry=r)  # fmt: skip
        self.events = Counter("patchrec_events_stored", "interactions appended", registry=r)
        self.state_failures = Counter("patchrec_state_update_failures",
                                      "PerSRec state updates that failed (rebuilt on the next request)",
                                      registry=r)  # fmt: skip

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)


__all__ = ["ServeMetrics"]
