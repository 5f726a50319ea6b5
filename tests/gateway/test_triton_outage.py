"""Triton stopped while the gateway runs: 503 within the deadline, then back without a restart."""

from __future__ import annotations

import time

import httpx

from sd_triton.gateway.process import GatewayProcess
from tests.conftest import free_port, triton_server
from tests.load import wait_until

BODY = {"prompt": "a fox", "steps": 3, "width": 64, "height": 48}
TIMEOUT_S = 5.0


def test_outage_and_recovery(exported: dict, tmp_path) -> None:
    triton = triton_server(exported["repo"], tmp_path / "triton.log")
    env = {"SD_GATEWAY_TRITON_TIMEOUT_S": str(TIMEOUT_S), "SD_GATEWAY_TRITON_PROBE_TIMEOUT_S": "1"}
    gateway = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "gateway.log", env=env)
    try:
        # 1. The gateway starts before Triton: alive, not ready, 503 for work.
        gateway.start(wait_ready=False)
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            assert http.get("/readyz").status_code == 503
            assert http.post("/v1/generate", json=BODY).status_code == 503

            # 2. Triton comes up: ready, and requests succeed.
            triton.start()
            wait_until(lambda: http.get("/readyz").status_code == 200, "ready after Triton started")
            assert http.post("/v1/generate", json=BODY).status_code == 200

            # 3. Triton stops: 503 with Retry-After, well within the deadline.
            triton.stop()
            started = time.monotonic()
            response = http.post("/v1/generate", json=BODY)
            assert response.status_code == 503, response.text
            assert time.monotonic() - started < TIMEOUT_S + 2
            assert int(response.headers["Retry-After"]) > 0
            assert "unavailable" in response.json()["error"]["message"]
            assert http.get("/readyz").status_code == 503
            assert http.get("/healthz").status_code == 200

            # 4. Triton back on the same ports: ready again, no gateway restart.
            triton.start()
            wait_until(lambda: http.get("/readyz").status_code == 200, "ready after Triton restarted")
            assert http.post("/v1/generate", json=BODY).status_code == 200
            assert gateway.process is not None and gateway.process.poll() is None
    finally:
        gateway.stop()
        triton.stop()
