"""Helpers of the access tests (keys, limits, policy): gateways with their own settings, Triton's
inference count, Prometheus samples."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sd_triton.gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port

CHEAP = {"steps": 1, "width": 32, "height": 32}  # the cheapest generation of the tiny model


def start_gateway(triton: TritonServer, log_file: Path, **env: str) -> GatewayProcess:
    """A gateway of its own on a free port; `env`: SD_GATEWAY_* (and SD_TRITON_REDIS_URL) settings."""
    env.setdefault("SD_TRITON_REDIS_URL", "")  # memory store unless a test asks for Redis
    process = GatewayProcess(triton.grpc_url, port=free_port(), log_file=log_file, env=env)
    return process.start()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sample(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when absent)."""
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0
