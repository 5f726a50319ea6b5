"""A small async load driver for the gateway: a fixed number of requests at a set concurrency, with
staggered starts, client-side latency percentiles, errors, and the gateway's and Triton's own time
split taken from their Prometheus `/metrics` before and after the run.

Locust was considered and left out: its gevent workers do not mix with the asyncio gateway tests,
and a closed-loop driver at fixed concurrency is all these measurements need.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from sd_triton import contract as c
from sd_triton.contract import INLINE_UNET_CALLS_METRIC, INLINE_UNET_ROWS_METRIC, INLINE_UNET_US_METRIC
from sd_triton.perf.stats import percentile

log = logging.getLogger(__name__)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
TRITON_STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class Load:
    url: str  # the gateway's base URL
    body: dict[str, Any]  # a /v1/generate body; each request gets seed = body["seed"] + its index
    concurrency: int = 1
    requests: int = 8
    stagger_s: float = 0.0  # worker i starts i * stagger_s after the first: arrivals do not line up
    path: str = "/v1/generate"
    timeout_s: float = 600.0
    gateway_metrics: bool = True  # scrape <url>/metrics before and after (False for other services)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests < 1:
            raise ValueError(
                f"concurrency and requests must be >= 1, got {self.concurrency}, {self.requests}"
            )
        if self.stagger_s < 0:
            raise ValueError(f"stagger_s must be >= 0, got {self.stagger_s}")


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    errors: int
    images: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    error_samples: list[str] = field(default_factory=list)
    gateway_split_ms: dict[str, float] = field(default_factory=dict)  # per request, by stage
    triton_split_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # per model, per inference

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
            "p50_ms": round(self.percentile(50), 1),
            "p95_ms": round(self.percentile(95), 1),
            "p99_ms": round(self.percentile(99), 1),
            "error_samples": self.error_samples[:5],
            "gateway_split_ms": self.gateway_split_ms,
            "triton_split_ms": self.triton_split_ms,
        }


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Samples:
    """Prometheus text format, sample names as written (prometheus_client's parser would rename
    Triton's counters to `..._total`)."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            samples[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = float(value)
        except ValueError:
            continue
    return samples


async def scrape(client: httpx.AsyncClient, url: str | None) -> Samples:
    if not url:
        return {}
    response = await client.get(url)
    response.raise_for_status()
    return parse_metrics(response.text)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def gateway_split(before: Samples, after: Samples) -> dict[str, float]:
    """Mean milliseconds per request in each gateway stage during the run."""
    split = {}
    for stage in ("queue", "inference", "encode"):
        count = _delta(before, after, "gateway_stage_seconds_count", stage=stage)
        if count > 0:
            split[stage] = round(
                1000 * _delta(before, after, "gateway_stage_seconds_sum", stage=stage) / count, 2
            )
    return split


def inline_unet_key(owner: str) -> str:
    """The split key of the UNet calls the loop model `owner` ran inline: "unet@denoise"."""
    return f"{c.UNET.name}@{owner}"


def triton_split(before: Samples, after: Samples) -> dict[str, dict[str, float]]:
    """Per model: requests, executions, inferences (batch rows), and mean milliseconds per request in
    queue and compute (Triton's cumulative `nv_inference_*_duration_us` counters)."""
    models = sorted(
        {dict(labels).get("model", "") for name, labels in after if name == "nv_inference_request_success"}
    )
    split: dict[str, dict[str, float]] = {}
    for model in models:
        labels = {"model": model, "version": "1"}
        count = _delta(before, after, "nv_inference_request_success", **labels)
        if count <= 0:
            continue
        split[model] = {
            "requests": count,
            "executions": _delta(before, after, "nv_inference_exec_count", **labels),
            "inferences": _delta(before, after, "nv_inference_count", **labels),  # batch rows
        }
        for stage in TRITON_STAGES:
            total_us = _delta(before, after, f"nv_inference_{stage}_duration_us", **labels)
            split[model][f"{stage}_ms"] = round(total_us / count / 1000.0, 2)
    # the UNet calls a loop ran inline (sd_triton.runtime.triton_io.InlineTimer): "unet@denoise", ...
    owners = sorted(
        {dict(labels).get("model", "") for name, labels in after if name == INLINE_UNET_CALLS_METRIC}
    )
    for owner in owners:
        calls = _delta(before, after, INLINE_UNET_CALLS_METRIC, model=owner)
        if calls > 0:
            total_us = _delta(before, after, INLINE_UNET_US_METRIC, model=owner)
            split[inline_unet_key(owner)] = {
                "executions": calls,
                "inferences": _delta(before, after, INLINE_UNET_ROWS_METRIC, model=owner),  # batch rows
                "compute_infer_ms": round(total_us / calls / 1000.0, 3),
            }
    return split


async def run_load(load: Load, triton_metrics_url: str | None = None) -> LoadResult:
    latencies: list[float] = []
    errors: list[str] = []
    images = 0
    next_index = 0
    base_seed = int(load.body.get("seed", 0))

    async def worker(client: httpx.AsyncClient, number: int) -> None:
        nonlocal next_index, images
        await asyncio.sleep(number * load.stagger_s)
        while next_index < load.requests:
            index, next_index = next_index, next_index + 1
            body = {**load.body, "seed": base_seed + index}
            sent = time.perf_counter()
            try:
                response = await client.post(load.path, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                continue
            latencies.append(1000 * (time.perf_counter() - sent))
            images += len(response.json()["images"])

    limits = httpx.Limits(max_connections=load.concurrency + 2)
    # every request is inferred: a load test measures the serving stack, not the gateway's result cache
    headers = {"Cache-Control": "no-cache"}
    async with httpx.AsyncClient(
        base_url=load.url, timeout=load.timeout_s, limits=limits, headers=headers
    ) as client:
        metrics_url = f"{load.url}/metrics" if load.gateway_metrics else None
        gateway_before = await scrape(client, metrics_url)
        triton_before = await scrape(client, triton_metrics_url)
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, n) for n in range(load.concurrency)))
        seconds = time.perf_counter() - started
        gateway_after = await scrape(client, metrics_url)
        triton_after = await scrape(client, triton_metrics_url)
    result = LoadResult(
        concurrency=load.concurrency,
        requests=load.requests,
        ok=len(latencies),
        errors=len(errors),
        images=images,
        seconds=seconds,
        latencies_ms=latencies,
        error_samples=errors,
        gateway_split_ms=gateway_split(gateway_before, gateway_after),
        triton_split_ms=triton_split(triton_before, triton_after),
    )
    log.info(
        "gateway load: concurrency %d, %d requests, %d errors, %.2f images/s, p50 %.0f ms",
        load.concurrency,
        load.requests,
        result.errors,
        result.images_per_s,
        result.percentile(50),
    )
    return result


def table(results: list[LoadResult]) -> str:
    head = (
        f"{'conc':>5} {'ok':>5} {'errors':>6} {'images/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}"
        "  gateway split (ms)"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        split = " ".join(f"{k}={v:g}" for k, v in r.gateway_split_ms.items())
        lines.append(
            f"{r.concurrency:>5} {r.ok:>5} {r.errors:>6} {r.images_per_s:>9.2f} {r.percentile(50):>9.1f} "
            f"{r.percentile(95):>9.1f} {r.percentile(99):>9.1f}  {split}"
        )
    triton = results[-1].triton_split_ms if results else {}
    if triton:
        lines.append(f"Triton, per inference at concurrency {results[-1].concurrency} (ms):")
        for model, stages in triton.items():
            lines.append(f"  {model:14s} " + " ".join(f"{k}={v:g}" for k, v in stages.items()))
    return "\n".join(lines)
