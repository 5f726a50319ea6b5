"""Triton stopped while the gateway runs: 503 within the deadline, then back without a restart; and a
gateway started while Triton is down: alive, not ready, then ready once Triton is up. One Triton start
(the session's spare Triton, stopped and started again)."""

from __future__ import annotations

import time

import httpx

from sd_triton.gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port
from tests.load import wait_until

BODY = {"prompt": "a fox", "steps": 3, "width": 64, "height": 48}
TIMEOUT_S = 5.0
ENV = {"SD_GATEWAY_TRITON_TIMEOUT_S": str(TIMEOUT_S), "SD_GATEWAY_TRITON_PROBE_TIMEOUT_S": "1"}


def test_outage_and_recovery(spare_triton: TritonServer, tmp_path) -> None:
    triton = spare_triton
    running = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "running.log", env=ENV)
    late = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "late.log", env=ENV)
    try:
        # 1. A gateway over a running Triton serves.
        running.start()
        with (
            httpx.Client(base_url=running.url, timeout=30) as http,
            httpx.Client(base_url=late.url, timeout=30) as late_http,
        ):
            assert http.post("/v1/generate", json=BODY).status_code == 200

            # 2. Triton stops: 503 with Retry-After, well within the deadline; alive, not ready.
            triton.stop()
            started = time.monotonic()
            response = http.post("/v1/generate", json=BODY)
            assert response.status_code == 503, response.text
            assert time.monotonic() - started < TIMEOUT_S + 2
            assert int(response.headers["Retry-After"]) > 0
            assert "unavailable" in response.json()["error"]["message"]
            assert http.get("/readyz").status_code == 503
            assert http.get("/healthz").status_code == 200

            # 3. A gateway started while Triton is down: alive, not ready, 503 for work.
            late.start(wait_ready=False)
            assert late_http.get("/healthz").status_code == 200
            assert late_http.get("/readyz").status_code == 503
            assert late_http.post("/v1/generate", json=BODY).status_code == 503

            # 4. Triton back on the same ports: both ready and serving, neither restarted.
            triton.start()
            for client, name in ((http, "the running gateway"), (late_http, "the late gateway")):
                wait_until(lambda c=client: c.get("/readyz").status_code == 200, f"{name} ready again")
                assert client.post("/v1/generate", json=BODY).status_code == 200
            for gateway in (running, late):
                assert gateway.process is not None and gateway.process.poll() is None
    finally:
        running.stop()
        late.stop()
