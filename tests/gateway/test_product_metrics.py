"""Product metrics on /metrics after real requests, Triton's metrics endpoint read by the gateway, and
the Grafana dashboard / Prometheus config: every metric name they use is one a real scrape exposes."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sd_triton.gateway.metrics import INFERENCE_ROUTES, parse_gpu_memory, triton_metrics_url
from sd_triton.gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port
from tests.gateway.inprocess import gateway_client

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "sd-triton-dashboard.json"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
FAST = {"steps": 3, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def metered(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway that reads the test Triton's metrics port (CPU-only: no GPU gauges)."""
    log_file = tmp_path_factory.mktemp("metered") / "gateway.log"
    env = {"SD_GATEWAY_TRITON_METRICS_URL": triton.metrics_url}
    with GatewayProcess(triton.grpc_url, port=free_port(), log_file=log_file, env=env) as gateway:
        yield gateway


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def test_product_metrics_count_requests(metered: GatewayProcess) -> None:
    with httpx.Client(base_url=metered.url, timeout=60) as http:
        before = samples(http.get("/metrics").text)
        body = {"prompt": f"a cat {uuid.uuid4().hex[:8]}", **FAST, "seed": 4, "num_images": 2}
        assert http.post("/v1/generate", json=body).json()["cache"] == "miss"
        assert http.post("/v1/generate", json=body).json()["cache"] == "hit"
        assert http.post("/v1/generate", json={"prompt": "a cat", "steps": 0}).status_code == 422
        assert (
            http.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x48"}).status_code == 200
        )
        http.get("/healthz")  # not a generation: not in inference_*
        after = samples(http.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("inference_requests_total", route="/v1/generate", status="200") == 2
    assert delta("inference_requests_total", route="/v1/generate", status="422") == 1
    assert delta("inference_requests_total", route="/v1/images/generations", status="200") == 1
    assert delta("inference_request_duration_seconds_count", route="/v1/generate") == 3
    assert delta("inference_request_duration_seconds_sum", route="/v1/generate") > 0
    assert not any(
        name.startswith("inference_") and dict(labels).get("route") == "/healthz" for name, labels in after
    )
    assert delta("images_generated_total") == 5  # 2 generated + 2 from the cache + 1 (OpenAI)
    assert delta("images_generated_total") == delta("gateway_images_generated_total")
    assert delta("cache_hits_total") == 1 and delta("cache_misses_total") == 1
    assert delta("gateway_cache_lookups_total", result="hit") == 1
    assert value(after, "inference_requests_in_flight") == 0
    assert delta("gateway_stage_seconds_count", stage="inference") == 2  # a hit runs no stages
    # Triton's metrics endpoint was read; a CPU-only Triton has no GPU memory to report
    assert value(after, "gateway_triton_metrics_up") == 1
    assert not [name for name, _ in after if name.startswith("gpu_memory")]


def test_triton_metrics_unreachable_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    with caplog.at_level(logging.WARNING), gateway_client(triton_metrics_url=url) as http:
        for _ in range(3):
            response = http.get("/metrics")
            assert response.status_code == 200
            assert value(samples(response.text), "gateway_triton_metrics_up") == 0
    warnings = [
        r.getMessage() for r in caplog.records if "metrics" in r.getMessage() and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1 and url in warnings[0], warnings  # named, and once (not per scrape)


def test_the_docs_name_every_route_the_inference_counters_count() -> None:
    row = next(
        line for line in (ROOT / "docs" / "storage-cache-metrics.md").read_text().splitlines()
        if line.startswith("| `inference_requests_total`")
    )  # fmt: skip
    assert set(re.findall(r"`(?:POST )?(/v1/[a-z/]+)`", row)) == INFERENCE_ROUTES


def test_gpu_memory_parsed_from_triton_format() -> None:
    # the lines a GPU Triton prints on its metrics port (names and labels as Triton writes them)
    text = (
        "# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes\n"
        "# TYPE nv_gpu_memory_used_bytes gauge\n"
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-1"} 1073741824\n'
        "# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes\n"
        "# TYPE nv_gpu_memory_total_bytes gauge\n"
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-1"} 85899345920\n'
        "# HELP nv_inference_count Number of inferences\n# TYPE nv_inference_count counter\n"
        'nv_inference_count{model="unet",version="1"} 7\n'
    )
    assert parse_gpu_memory(text) == {
        "nv_gpu_memory_used_bytes": {"GPU-1": 1073741824.0},
        "nv_gpu_memory_total_bytes": {"GPU-1": 85899345920.0},
    }
    assert triton_metrics_url("triton:8001", None) == "http://triton:8002/metrics"
    assert triton_metrics_url("triton:8001", "") is None


# --- the dashboard and the Prometheus config ---

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def promql_metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+e\d+|e\d+", n)}


def exposed_names(text: str) -> set[str]:
    """Every sample name a scrape's families can carry (from their TYPE lines), samples or not."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        names.add(name)
        if kind == "counter":
            names |= {name + "_total"} if not name.endswith("_total") else set()
        if kind == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_dashboard_uses_only_exposed_metrics(metered: GatewayProcess, triton: TritonServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    gateway_text = httpx.get(metered.url + "/metrics").text
    triton_text = httpx.get(triton.metrics_url).text
    exposed = exposed_names(gateway_text) | exposed_names(triton_text)
    assert not used - exposed, f"dashboard metrics nobody exposes: {sorted(used - exposed)}"
    # it covers what it promises: the product metrics, and Triton's queue/compute time per model
    for name in (
        "inference_requests_total",
        "inference_request_duration_seconds_bucket",
        "images_generated_total",
        "cache_hits_total",
        "gateway_rejections_total",
        "gateway_jobs_total",
        "inference_requests_in_flight",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "gpu_memory_usage_bytes",
    ):
        assert name in used, name
    assert {n for n in used if n.startswith("nv_")} <= exposed_names(triton_text)


def test_prometheus_scrapes_gateway_and_triton() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["sd-triton-gateway"] == ["gateway:8080"]
    assert targets["triton"] == ["triton:8002"]  # Triton's own metrics port, scraped directly
