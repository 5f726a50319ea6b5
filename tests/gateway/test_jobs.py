"""Async jobs as the gateway's own logic, in-process (FastAPI's TestClient over the in-memory Triton,
tests/gateway/inprocess.py): the events and their order, replay, queue positions, cancelling, input
checks, webhook signing and retries (a real HTTP receiver), the cache, and two replicas sharing jobs
through a real redis-server. What needs real Triton (the streamed pixels, Triton dropping a cancelled
request from its batch, jobs sharing continuous batches, draining at SIGTERM) is in
tests/integration/test_jobs.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sd_triton.gateway.jobs.webhooks import refused_target, verify
from tests.conftest import free_port
from tests.gateway.inprocess import FakeTriton, fake_images, gateway_client
from tests.load import job_events as events
from tests.load import wait_until

SECRET = "whsec-test-secret"


def png(data: str) -> np.ndarray:
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(raw))).convert("RGB"))


@pytest.fixture(scope="module")
def fake() -> FakeTriton:
    return FakeTriton(step_s=0.01)


@pytest.fixture(scope="module")
def jobs(fake: FakeTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Open mode, a webhook secret, fast webhook retries, one job at a time."""
    folder = tmp_path_factory.mktemp("jobs-gateway")
    with gateway_client(
        fake,
        webhook_secret=SECRET,
        webhook_backoff_s=0.1,
        webhook_allow_private=True,  # the test receiver listens on loopback
        jobs_max_running=1,
        storage_dir=str(folder / "images"),
    ) as client:
        yield client


def test_events_are_queued_then_every_step_then_completed(jobs: TestClient) -> None:
    params = {"height": 64, "width": 48, "steps": 8, "guidance_scale": 5.0, "seed": 21, "scheduler": "ddim"}
    response = jobs.post("/v1/jobs", json={"prompt": "a green square", **params, "preview": True})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["events_url"].endswith(f"/v1/jobs/{job['id']}/events")

    frames = list(events(jobs, job["id"]))
    names = [f["event"] for f in frames]
    assert names == ["queued"] + ["step"] * 8 + ["completed"], names
    assert [int(f["id"]) for f in frames] == list(range(1, 11))  # SSE ids: the event sequence
    assert frames[0]["data"]["position"] == 1
    steps = [f["data"] for f in frames[1:-1]]
    assert [s["step"] for s in steps] == list(range(1, 9)) and {s["steps"] for s in steps} == {8}
    assert steps[-1]["eta_s"] == 0 and all(s["eta_s"] >= 0 for s in steps)
    # previews travel with live events only (a replay leaves them out): those seen are the backend's
    assert all(png(s["preview"]).shape == (8, 8, 3) for s in steps if "preview" in s)

    result = frames[-1]["data"]["result"]
    np.testing.assert_array_equal(
        png(result["images"][0]["base64"]), fake_images("a green square", 21, 1, 64, 48)[0]
    )
    status = jobs.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "completed" and status["progress"]["step"] == 8
    assert status["result"]["images"][0]["base64"] == result["images"][0]["base64"]


def test_late_subscriber_replays_from_last_event_id(jobs: TestClient) -> None:
    job = jobs.post("/v1/jobs", json={"prompt": "a dot", "steps": 3, "width": 32, "height": 32}).json()
    assert [f["event"] for f in events(jobs, job["id"])][-1] == "completed"
    replay = list(events(jobs, job["id"]))  # after the end: the whole history again
    assert [f["event"] for f in replay] == ["queued", "step", "step", "step", "completed"]
    resumed = list(events(jobs, job["id"], headers={"Last-Event-ID": "3"}))
    assert [(f["id"], f["event"]) for f in resumed] == [("4", "step"), ("5", "completed")]


def _step(client: TestClient, job_id: str) -> int:
    progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
    return progress["step"] if progress else 0


def test_cancel_mid_run_stops_at_the_next_step(jobs: TestClient, fake: FakeTriton) -> None:
    job = jobs.post("/v1/jobs", json={"prompt": "a long one", "steps": 150, "width": 32, "height": 32}).json()
    wait_until(lambda: _step(jobs, job["id"]) >= 5, "at step 5", timeout_s=10, interval_s=0.01)
    cancelled = jobs.delete(f"/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled", cancelled
    at_cancel = cancelled["progress"]["step"]
    frames = list(events(jobs, job["id"]))
    assert frames[-1]["event"] == "cancelled" and "completed" not in [f["event"] for f in frames]
    time.sleep(0.2)  # no step after the cancel
    assert _step(jobs, job["id"]) == at_cancel < 150
    # a finished job stays as it was
    assert jobs.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_queue_position_and_cancel_while_queued(jobs: TestClient) -> None:
    body = {"prompt": "wait", "steps": 150, "width": 32, "height": 32}
    running, second, third = (jobs.post("/v1/jobs", json=body).json() for _ in range(3))
    assert second["queue_position"] in (1, 2) and third["queue_position"] == second["queue_position"] + 1
    gone = jobs.delete(f"/v1/jobs/{second['id']}").json()
    assert gone["status"] == "cancelled" and gone["progress"] is None  # never ran
    assert jobs.get(f"/v1/jobs/{third['id']}").json()["queue_position"] == second["queue_position"]
    for job in (running, third):
        assert jobs.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_bad_job_input_is_refused_before_queueing(jobs: TestClient, fake: FakeTriton) -> None:
    calls = len(fake.calls)
    response = jobs.post("/v1/jobs", json={"prompt": "x", "width": 1001})
    assert response.status_code == 422 and response.json()["error"]["field"] == "width"
    response = jobs.post("/v1/jobs", json={"prompt": "x", "webhook_url": "ftp://example.com/hook"})
    assert response.status_code == 422 and "webhook_url" in response.json()["error"]["message"]
    response = jobs.get("/v1/jobs/job_unknown")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert len(fake.calls) == calls
    # no webhook secret and no keys: a webhook cannot be signed
    with gateway_client() as unsigned:
        response = unsigned.post("/v1/jobs", json={"prompt": "x", "webhook_url": "http://127.0.0.1:9/hook"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "webhook_url"


class Receiver:
    """A real HTTP server that answers 503 to the first `failures` deliveries, then 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 503 if len(outer.received) < outer.failures else 200
                outer.received.append((dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_webhook_is_signed_and_retried(jobs: TestClient) -> None:
    receiver = Receiver(failures=2)
    try:
        body = {"prompt": "a hook", "steps": 2, "width": 32, "height": 32, "webhook_url": receiver.url}
        job = jobs.post("/v1/jobs", json=body).json()
        status: dict[str, Any] = {}

        def delivered() -> bool:
            status.update(jobs.get(f"/v1/jobs/{job['id']}").json())
            return bool(status["webhook"]["delivered"])

        wait_until(delivered, "the webhook delivered", timeout_s=30, interval_s=0.05)
        assert status["webhook"] == {
            "url": receiver.url, "attempts": 3, "delivered": True, "last_status": 200, "last_error": None,
        }  # fmt: skip
        assert [status for _, _, status in receiver.received] == [503, 503, 200]
        headers, raw, _ = receiver.received[-1]
        assert verify(SECRET, headers, raw)
        assert not verify("another-secret", headers, raw)
        assert not verify(SECRET, headers, raw.replace(b"completed", b"cancelled"))
        payload = json.loads(raw)
        assert payload["id"] == job["id"] and payload["status"] == "completed"
        assert payload["result"]["images"][0]["base64"]
        assert headers["X-SD-Triton-Event"] == "job.completed"
    finally:
        receiver.close()


def test_a_cached_job_completes_without_steps(jobs: TestClient, fake: FakeTriton) -> None:
    body = {"prompt": "cached job", "steps": 3, "width": 32, "height": 32, "seed": 77}
    first = jobs.post("/v1/jobs", json=body).json()
    assert [f["event"] for f in events(jobs, first["id"])][-1] == "completed"
    calls = len(fake.calls)
    second = jobs.post("/v1/jobs", json=body).json()
    frames = list(events(jobs, second["id"]))
    assert [f["event"] for f in frames] == ["queued", "completed"]  # a seeded repeat: no Triton work
    assert frames[-1]["data"]["result"]["cache"] == "hit" and len(fake.calls) == calls
    done = jobs.get(f"/v1/jobs/{first['id']}").json()["result"]
    assert frames[-1]["data"]["result"]["images"][0]["base64"] == done["images"][0]["base64"]


def test_two_replicas_share_jobs_through_redis(redis_url: str) -> None:
    shared = FakeTriton(step_s=0.01)
    with gateway_client(shared, redis_url=redis_url) as a, gateway_client(shared, redis_url=redis_url) as b:
        job = a.post("/v1/jobs", json={"prompt": "shared", "steps": 4, "width": 32, "height": 32}).json()
        names = [f["event"] for f in events(b, job["id"])]  # followed on the other replica
        assert names == ["queued", "step", "step", "step", "step", "completed"]
        assert b.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed"
        long = a.post("/v1/jobs", json={"prompt": "long", "steps": 150, "width": 32, "height": 32}).json()
        wait_until(lambda: _step(b, long["id"]) >= 1, "running", timeout_s=10, interval_s=0.01)
        assert b.delete(f"/v1/jobs/{long['id']}").json()["status"] == "cancelled"  # cancelled elsewhere
        wait_until(lambda: a.get(f"/v1/jobs/{long['id']}").json()["status"] == "cancelled", "seen by a")
        assert a.get(f"/v1/jobs/{long['id']}").json()["progress"]["step"] < 150


def test_jobs_fail_closed_without_redis() -> None:
    """Jobs need the shared store: with Redis down they are refused 503, while /v1/generate goes on
    (limits fail open, the cache is bypassed)."""
    with gateway_client(redis_url=f"redis://127.0.0.1:{free_port()}/0") as http:  # nothing listens there
        response = http.post("/v1/jobs", json={"prompt": "no store", "steps": 2})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "state_unavailable" and response.headers["Retry-After"]
        assert http.post("/v1/generate", json={"prompt": "still", "steps": 2, "seed": 1}).status_code == 200


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:9/hook", "127.0.0.1"),
        ("http://localhost/hook", "not a public address"),
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("https://192.168.0.10/hook", "192.168.0.10"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # cloud metadata
        ("http://[::1]:8080/hook", "::1"),
        ("http://0.0.0.0/hook", "0.0.0.0"),
        ("http://100.64.0.1/hook", "100.64.0.1"),  # carrier-grade NAT
        ("http://nothing.invalid/hook", "cannot resolve"),
        ("http://8.8.8.8/hook", None),
    ],
)
def test_webhook_targets_on_private_networks_are_refused(url: str, refused: str | None) -> None:
    reason = asyncio.run(refused_target(url, allow_private=False))
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith("webhook_url:") and refused in reason, reason
    assert asyncio.run(refused_target(url, allow_private=True)) is None


def test_a_private_webhook_target_is_refused_at_submission() -> None:
    with gateway_client(webhook_secret=SECRET) as http:  # private targets not allowed (the default)
        body = {"prompt": "x", "steps": 2, "width": 32, "height": 32}
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data"):
            response = http.post("/v1/jobs", json={**body, "webhook_url": url})
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["field"] == "webhook_url" and "not a public address" in error["message"]
