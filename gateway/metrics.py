"""Prometheus metrics, one registry per app, recorded by a small ASGI middleware."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("gateway_in_flight_requests", "requests being served", registry=self.registry)
        self.images = Counter("gateway_images_generated", "images returned", registry=self.registry)
        self.stage = Histogram(
            "gateway_stage_seconds",
            "time of a generation by stage: queue (before Triton), inference (Triton calls), encode",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "gateway_rejections",
            "requests refused before any Triton work, by reason "
            "(auth, rate_limit, quota, concurrency, content_policy, invalid)",
            ["reason"],
            registry=self.registry,
        )
        self.cache = Counter(
            "gateway_cache_lookups", "result cache lookups by result (hit, miss)", ["result"],
            registry=self.registry,
        )  # fmt: skip
        self.jobs = Counter(
            "gateway_jobs", "async jobs reaching a state (queued, running, completed, failed, cancelled)",
            ["state"], registry=self.registry,
        )  # fmt: skip


def route_label(scope: Scope) -> str:
    route: Any = scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.in_flight.dec()
            route = route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
