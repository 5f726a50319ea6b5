"""Prometheus metrics, one registry per app, recorded by a small ASGI middleware.

Two families of names: the gateway's own `gateway_*`, and the names users of hosted image APIs look
for (`inference_requests_total`, `inference_request_duration_seconds`, `inference_requests_in_flight`,
`images_generated_total`, `cache_hits_total`, `cache_misses_total`, `gpu_memory_usage_bytes`).
The GPU gauges are copied from Triton's own metrics endpoint on each scrape; a CPU-only Triton has
none, so they have no samples there. See docs/storage-cache-metrics.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd_triton.gateway.middleware import DISCONNECTED

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# the routes that run (or would run) a generation: `inference_*` metrics count only these
INFERENCE_ROUTES = frozenset({"/v1/generate", "/v1/generate/batch", "/v1/images/generations", "/v1/jobs"})
# Triton's GPU memory gauges (nv_gpu_*) and the names the gateway re-exports them under
GPU_METRICS = {
    "nv_gpu_memory_used_bytes": "gpu_memory_usage_bytes",
    "nv_gpu_memory_total_bytes": "gpu_memory_total_bytes",
}


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
            "(auth, rate_limit, quota, concurrency, content_policy, invalid, overloaded)",
            ["reason"],
            registry=self.registry,
        )
        self.cache = Counter(
            "gateway_cache_lookups", "result cache lookups by result (hit, miss, bypass, error)", ["result"],
            registry=self.registry,
        )  # fmt: skip
        self.jobs = Counter(
            "gateway_jobs",
            "async jobs reaching a state (queued, running, retrying, completed, failed, cancelled)",
            ["state"], registry=self.registry,
        )  # fmt: skip
        # --- the names of hosted image APIs ---
        self.inference_requests = Counter(
            "inference_requests", "generation requests by route and HTTP status", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.inference_latency = Histogram(
            "inference_request_duration_seconds", "generation request latency, end to end", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inference_in_flight = Gauge(
            "inference_requests_in_flight", "generation requests being served", registry=self.registry
        )
        self.gpu_memory = {
            triton_name: Gauge(
                name, f"GPU memory, from Triton's {triton_name}", ["gpu_uuid"], registry=self.registry
            )
            for triton_name, name in GPU_METRICS.items()
        }
        self.triton_endpoint_up = Gauge(
            "gateway_triton_endpoint_up", "1 while a Triton endpoint is in rotation (its txt2img ready)",
            ["endpoint"], registry=self.registry,
        )  # fmt: skip
        self.triton_endpoint_in_flight = Gauge(
            "gateway_triton_endpoint_in_flight", "calls in flight on a Triton endpoint", ["endpoint"],
            registry=self.registry,
        )  # fmt: skip
        self.triton_metrics_up = Gauge(
            "gateway_triton_metrics_up", "1 when the last read of Triton's metrics endpoint worked",
            registry=self.registry,
        )  # fmt: skip
        self.state_errors = Counter(
            "gateway_state_errors", "failed Redis calls by use: limits fail open, the cache is bypassed",
            ["use"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(_ProductTotals(self))


def _total(counter: Counter, **labels: str) -> float:
    return sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class _ProductTotals(Collector):
    """Totals under hosted-API names, read from the gateway_* counters when scraped (never out of step)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def _families(self, with_values: bool) -> Iterable[Metric]:
        m = self.metrics
        for name, doc, counter, labels in (
            ("images_generated", "images returned, generated or from the cache", m.images, {}),
            ("cache_hits", "seeded requests answered from the result cache", m.cache, {"result": "hit"}),
            ("cache_misses", "seeded requests not in the result cache", m.cache, {"result": "miss"}),
            (
                "cache_bypasses",
                "seeded requests that asked for a fresh generation (no-cache)",
                m.cache,
                {"result": "bypass"},
            ),  # fmt: skip
        ):
            yield CounterMetricFamily(name, doc, value=_total(counter, **labels) if with_values else None)

    def describe(self) -> Iterable[Metric]:
        return self._families(with_values=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(with_values=True)


def triton_metrics_url(triton_url: str, configured: str | None) -> str | None:
    """The configured URL; unset: Triton's default metrics port on the (first) gRPC endpoint's host;
    "": off."""
    if configured is not None:
        return configured or None
    first = triton_url.split(",")[0].strip().removeprefix("dns:")
    host = first.rsplit(":", 1)[0] if ":" in first else first
    return f"http://{host}:8002/metrics"


def parse_gpu_memory(text: str) -> dict[str, dict[str, float]]:
    """Triton's nv_gpu_memory_* gauges from its Prometheus text: {triton name: {gpu_uuid: bytes}}."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in GPU_METRICS:
            for sample in family.samples:
                found.setdefault(family.name, {})[sample.labels.get("gpu_uuid", "")] = sample.value
    return found


class TritonMetricsScraper:
    """Reads Triton's metrics endpoint (with a short timeout) into the GPU memory gauges. When it cannot,
    `gateway_triton_metrics_up` is 0 and a WARNING names the URL (at most once every WARN_EVERY_S)."""

    WARN_EVERY_S = 300.0

    def __init__(self, url: str | None, timeout_s: float, metrics: GatewayMetrics) -> None:
        self.url = url
        self.metrics = metrics
        self.client = httpx.AsyncClient(timeout=timeout_s)
        self._warned_at: float | None = None

    async def scrape(self) -> None:
        if self.url is None:
            return
        try:
            response = await self.client.get(self.url)
            response.raise_for_status()
            found = parse_gpu_memory(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= self.WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "Triton's metrics at %s cannot be read (%s): no GPU memory gauges; set "
                    "SD_GATEWAY_TRITON_METRICS_URL to Triton's metrics port, or empty to turn this off",
                    self.url, exc or type(exc).__name__,
                )  # fmt: skip
            found, up = {}, 0
        else:
            up = 1
        self.metrics.triton_metrics_up.set(up)
        for triton_name, gauge in self.metrics.gpu_memory.items():
            gauge.clear()  # a GPU that went away (or a CPU-only Triton) leaves no stale samples
            for uuid, value in found.get(triton_name, {}).items():
                gauge.labels(gpu_uuid=uuid).set(value)

    async def close(self) -> None:
        await self.client.aclose()


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

        inference = scope.get("method") == "POST" and scope.get("path") in INFERENCE_ROUTES
        self.metrics.in_flight.inc()
        if inference:
            self.metrics.inference_in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            if scope.get(DISCONNECTED):
                status = 499  # client closed the request (nginx's code): no response was sent
            self.metrics.in_flight.dec()
            route = route_label(scope)
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            if inference:
                self.metrics.inference_in_flight.dec()
                path = str(scope["path"])  # the route's own path: a request refused before routing counts too
                self.metrics.inference_requests.labels(path, str(status)).inc()
                self.metrics.inference_latency.labels(path).observe(elapsed)
