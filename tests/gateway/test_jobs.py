"""Async jobs over real HTTP: the real gateway, real Triton (txt2img_stream streaming the steps),
a real webhook receiver, and a real redis-server for two gateway replicas."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sd_triton.gateway.jobs.models import JobRecord
from sd_triton.gateway.jobs.webhooks import refused_target, verify
from sd_triton.gateway.process import GatewayProcess
from sd_triton.gateway.state import RedisStore
from sd_triton.triton_server import TritonServer
from sd_triton.txt2img_client import txt2img
from tests.conftest import free_port, triton_executions
from tests.load import job_events as events

SECRET = "whsec-test-secret"
log = logging.getLogger(__name__)


def png(data: str) -> np.ndarray:
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(raw))).convert("RGB"))


@pytest.fixture(scope="module")
def jobs_gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Open mode (no keys, tests/conftest.py), a webhook secret, fast webhook retries, one job at a time."""
    folder = tmp_path_factory.mktemp("jobs-gateway")
    env = {
        "SD_GATEWAY_WEBHOOK_SECRET": SECRET,
        "SD_GATEWAY_WEBHOOK_BACKOFF_S": "0.1",
        "SD_GATEWAY_WEBHOOK_ALLOW_PRIVATE": "true",  # the test receiver listens on loopback
        "SD_GATEWAY_JOBS_MAX_RUNNING": "1",
        "SD_GATEWAY_STORAGE_DIR": str(folder / "images"),
    }
    with GatewayProcess(triton.grpc_url, port=free_port(), log_file=folder / "gateway.log", env=env) as gw:
        yield gw


@pytest.fixture(scope="module")
def jobs_http(jobs_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=jobs_gateway.url, timeout=60) as client:
        yield client


def test_events_are_queued_then_every_step_then_completed(jobs_http: httpx.Client, client) -> None:
    params = {"height": 64, "width": 48, "steps": 8, "guidance_scale": 5.0, "seed": 21, "scheduler": "ddim"}
    response = jobs_http.post("/v1/jobs", json={"prompt": "a green square", **params, "preview": True})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["events_url"].endswith(f"/v1/jobs/{job['id']}/events")

    frames = list(events(jobs_http, job["id"]))
    names = [f["event"] for f in frames]
    assert names == ["queued"] + ["step"] * 8 + ["completed"], names
    assert [int(f["id"]) for f in frames] == list(range(1, 11))  # SSE ids: the event sequence
    assert frames[0]["data"]["position"] == 1
    steps = [f["data"] for f in frames[1:-1]]
    assert [s["step"] for s in steps] == list(range(1, 9)) and {s["steps"] for s in steps} == {8}
    assert steps[-1]["eta_s"] == 0 and all(s["eta_s"] >= 0 for s in steps)
    assert all(png(s["preview"]).shape == (8, 6, 3) for s in steps)  # latent resolution: 1/8

    result = frames[-1]["data"]["result"]
    image = png(result["images"][0]["base64"])
    # the streamed pipeline draws exactly what the txt2img ensemble draws
    direct = txt2img(client, "a green square", num_images=1, **params).images[0]
    np.testing.assert_array_equal(image, direct)
    status = jobs_http.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "completed" and status["progress"]["step"] == 8
    assert status["result"]["images"][0]["base64"] == result["images"][0]["base64"]


def test_late_subscriber_replays_from_last_event_id(jobs_http: httpx.Client) -> None:
    job = jobs_http.post(
        "/v1/jobs", json={"prompt": "a dot", "steps": 3, "width": 32, "height": 32, "scheduler": "ddim"}
    ).json()
    assert [f["event"] for f in events(jobs_http, job["id"])][-1] == "completed"
    replay = list(events(jobs_http, job["id"]))  # after the end: the whole history again
    assert [f["event"] for f in replay] == ["queued", "step", "step", "step", "completed"]
    resumed = list(events(jobs_http, job["id"], headers={"Last-Event-ID": "3"}))
    assert [(f["id"], f["event"]) for f in resumed] == [("4", "step"), ("5", "completed")]


def test_cancel_mid_run_stops_at_the_next_step(jobs_http: httpx.Client, client) -> None:
    before = triton_executions(client, "unet")
    job = jobs_http.post(
        "/v1/jobs", json={"prompt": "a long one", "steps": 150, "width": 32, "height": 32}
    ).json()
    stream = events(jobs_http, job["id"])
    for frame in stream:
        if frame["event"] == "step" and frame["data"]["step"] >= 5:
            break
    cancelled = jobs_http.delete(f"/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled", cancelled
    at_cancel = cancelled["progress"]["step"]
    rest = [f["event"] for f in stream]
    assert rest[-1] == "cancelled" and "completed" not in rest
    time.sleep(0.3)
    ran = triton_executions(client, "unet") - before
    time.sleep(0.5)  # Triton dropped it from the batch: no UNet call since
    assert triton_executions(client, "unet") - before == ran
    log.info("cancel: the job was at step %d, the UNet ran %d times for it", at_cancel, ran)
    assert at_cancel <= ran <= at_cancel + 2 < 150, (at_cancel, ran)
    # a finished job stays as it was
    assert jobs_http.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_queue_position_and_cancel_while_queued(jobs_http: httpx.Client) -> None:
    body = {"prompt": "wait", "steps": 150, "width": 32, "height": 32}
    running, second, third = (jobs_http.post("/v1/jobs", json=body).json() for _ in range(3))
    assert second["queue_position"] in (1, 2) and third["queue_position"] == second["queue_position"] + 1
    assert next(events(jobs_http, third["id"]))["data"]["position"] == third["queue_position"]
    gone = jobs_http.delete(f"/v1/jobs/{second['id']}").json()
    assert gone["status"] == "cancelled" and gone["progress"] is None  # never ran
    assert jobs_http.get(f"/v1/jobs/{third['id']}").json()["queue_position"] == second["queue_position"]
    for job in (running, third):
        assert jobs_http.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_bad_job_input_is_refused_before_queueing(jobs_http: httpx.Client, http: httpx.Client) -> None:
    response = jobs_http.post("/v1/jobs", json={"prompt": "x", "width": 1001})
    assert response.status_code == 422 and response.json()["error"]["field"] == "width"
    response = jobs_http.post("/v1/jobs", json={"prompt": "x", "webhook_url": "ftp://example.com/hook"})
    assert response.status_code == 422 and "webhook_url" in response.json()["error"]["message"]
    response = jobs_http.get("/v1/jobs/job_unknown")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    # the session gateway has no webhook secret and no keys: a webhook cannot be signed
    response = http.post("/v1/jobs", json={"prompt": "x", "webhook_url": "http://127.0.0.1:9/hook"})
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


def test_webhook_is_signed_and_retried(jobs_http: httpx.Client) -> None:
    receiver = Receiver(failures=2)
    try:
        body = {"prompt": "a hook", "steps": 2, "width": 32, "height": 32, "webhook_url": receiver.url}
        job = jobs_http.post("/v1/jobs", json=body).json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = jobs_http.get(f"/v1/jobs/{job['id']}").json()
            if status["webhook"]["delivered"]:
                break
            time.sleep(0.1)
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


def test_two_replicas_share_jobs_through_redis(triton: TritonServer, redis_url: str, tmp_path: Path) -> None:
    env = {"SD_TRITON_REDIS_URL": redis_url}
    one = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "one.log", env=env)
    two = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "two.log", env=env)
    with (
        one,
        two,
        httpx.Client(base_url=one.url, timeout=60) as a,
        httpx.Client(base_url=two.url, timeout=60) as b,
    ):
        job = a.post(
            "/v1/jobs", json={"prompt": "shared", "steps": 4, "width": 32, "height": 32, "scheduler": "ddim"}
        ).json()
        names = [f["event"] for f in events(b, job["id"])]  # followed on the other replica
        assert names == ["queued", "step", "step", "step", "step", "completed"]
        assert b.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed"
        long = a.post("/v1/jobs", json={"prompt": "long", "steps": 150, "width": 32, "height": 32}).json()
        for frame in events(b, long["id"]):
            if frame["event"] == "step":
                break
        assert b.delete(f"/v1/jobs/{long['id']}").json()["status"] == "cancelled"  # cancelled elsewhere
        assert a.get(f"/v1/jobs/{long['id']}").json()["progress"]["step"] < 150


def test_a_cached_job_completes_without_steps(jobs_http: httpx.Client) -> None:
    body = {"prompt": "cached job", "steps": 3, "width": 32, "height": 32, "seed": 77}
    first = jobs_http.post("/v1/jobs", json=body).json()
    assert [f["event"] for f in events(jobs_http, first["id"])][-1] == "completed"
    second = jobs_http.post("/v1/jobs", json=body).json()
    frames = list(events(jobs_http, second["id"]))
    assert [f["event"] for f in frames] == ["queued", "completed"]  # a seeded repeat: no Triton work
    assert frames[-1]["data"]["result"]["cache"] == "hit"
    done = jobs_http.get(f"/v1/jobs/{first['id']}").json()["result"]
    assert frames[-1]["data"]["result"]["images"][0]["base64"] == done["images"][0]["base64"]


def test_jobs_fail_closed_without_redis(triton: TritonServer, tmp_path: Path) -> None:
    """Jobs need the shared store: with Redis down they are refused 503, while /v1/generate goes on
    (limits fail open, the cache is bypassed)."""
    env = {
        "SD_TRITON_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
    }
    with (
        GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "gw.log", env=env) as gw,
        httpx.Client(base_url=gw.url, timeout=60) as http,
    ):
        response = http.post("/v1/jobs", json={"prompt": "no store", "steps": 2})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "state_unavailable" and response.headers["Retry-After"]
        assert http.post("/v1/generate", json={"prompt": "still", "steps": 2, "seed": 1}).status_code == 200


def test_a_stopping_gateway_lets_running_jobs_finish_then_fails_the_rest(
    triton: TritonServer, redis_url: str, tmp_path: Path
) -> None:
    """SIGTERM: no new job is taken; running jobs get JOB_DRAIN_S to finish, the rest end `failed`
    (read back from Redis once the gateway is gone)."""
    env = {
        "SD_TRITON_REDIS_URL": redis_url,
        "SD_GATEWAY_JOB_DRAIN_S": "0.5",
    }
    gateway = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "gw.log", env=env).start()
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        long = http.post("/v1/jobs", json={"prompt": "too long", "steps": 150, "width": 256, "height": 256})
        short = http.post("/v1/jobs", json={"prompt": "short", "steps": 3, "width": 32, "height": 32})
        ids = {"long": long.json()["id"], "short": short.json()["id"]}
        for name in ("long", "short"):
            frames = []
            for f in events(http, ids[name]):
                frames.append(f)
                if f["event"] == "step":
                    break
            assert frames[-1]["event"] == "step", frames
    gateway.stop()

    async def records() -> dict[str, JobRecord]:
        store = RedisStore(redis_url)
        try:
            return {
                n: JobRecord.model_validate_json(await store.get(f"job:{i}") or b"") for n, i in ids.items()
            }
        finally:
            await store.close()

    found = asyncio.run(records())
    assert found["short"].status == "completed"
    long = found["long"]
    seen = long.model_dump_json(exclude={"result"})
    assert long.status == "failed" and "stopped" in long.error.message, seen
    assert long.progress.step < 150


def test_jobs_submitted_together_run_together(http: httpx.Client) -> None:
    """The session gateway runs up to 8 jobs at once: two submitted back to back (two shapes) both
    stream every step and complete (the second once joined the batch unprepared and never advanced)."""
    bodies = [
        {"prompt": "together one", "steps": 30, "width": 64, "height": 64, "scheduler": "ddim"},
        {"prompt": "together two", "steps": 3, "width": 32, "height": 32, "scheduler": "ddim"},
    ]
    jobs = [http.post("/v1/jobs", json=body).json() for body in bodies]
    for job, body in zip(jobs, bodies, strict=True):
        names = [f["event"] for f in events(http, job["id"])]
        assert names == ["queued"] + ["step"] * body["steps"] + ["completed"], names


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


def test_a_private_webhook_target_is_refused_at_submission(triton: TritonServer, tmp_path: Path) -> None:
    env = {"SD_GATEWAY_WEBHOOK_SECRET": SECRET}  # signed webhooks, private targets not allowed (the default)
    with GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "gw.log", env=env) as gateway:
        body = {"prompt": "x", "steps": 2, "width": 32, "height": 32}
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data"):
            response = httpx.post(f"{gateway.url}/v1/jobs", json={**body, "webhook_url": url}, timeout=30)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["field"] == "webhook_url" and "not a public address" in error["message"]
