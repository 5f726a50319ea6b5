"""Property-based fuzzing of every gateway route, generated from the gateway's own OpenAPI document
(schemathesis), against a real gateway process in front of the session's real Triton server.

Each route gets cases of both kinds schemathesis makes: positive ones (valid per the schema; the
gateway's own limits, which the schema does not carry, still refuse many) and negative ones (a body,
parameter or header that breaks the schema: wrong types, missing or unknown fields, out-of-range
values, non-JSON bytes). Whatever comes: never a 5xx, and every 4xx is JSON with a non-empty message
that names the field it blames, in the gateway's shape ({"error": {"type", "message", ...}}) or, on the
OpenAI route, OpenAI's ({"error": {"message", "type", "param", "code"}}).

Runs are reproducible (hypothesis derandomized, no example database). The gateway runs with tighter
limits than its defaults so valid generations stay cheap on CPU: at most 64 x 64 pixels
(`max_pixels`), 4 prompts per batch, and the generation bodies' step counts within the model's range
lowered to STEPS (a count the model refuses is sent as generated).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.schemas import OpenApiSchema

from sd_triton.gateway.errors import OPENAI_PATH
from sd_triton.gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port

log = logging.getLogger(__name__)

MIN_CASES = 500
STEPS = 2  # denoising steps of a valid generation the fuzz sends
GENERATION_ROUTES = {"POST /v1/generate", "POST /v1/generate/batch", "POST /v1/jobs"}
# generated cases per route and mode; a route with nothing to vary (no parameters, no body) ends early
EXAMPLES = {
    "POST /v1/generate": 60,
    "POST /v1/generate/batch": 50,
    "POST /v1/images/generations": 50,
    "POST /v1/jobs": 50,
}
DEFAULT_EXAMPLES = 25
JOB_TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def fuzz_gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway of its own (the jobs the fuzz submits stay out of the session gateway's queue)."""
    folder = tmp_path_factory.mktemp("fuzz-gateway")
    env = {
        "SD_GATEWAY_MAX_PIXELS": "4096",  # 64 x 64, the tiny model's native size
        "SD_GATEWAY_MAX_BATCH_PROMPTS": "4",
        "SD_GATEWAY_STORAGE_DIR": str(folder / "images"),
        "SD_GATEWAY_TRITON_METRICS_URL": triton.metrics_url,
        "SD_GATEWAY_JOBS_MAX_RUNNING": "2",
    }
    process = GatewayProcess(triton.grpc_url, port=free_port(), log_file=folder / "gateway.log", env=env)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def schema(fuzz_gateway: GatewayProcess) -> OpenApiSchema:
    """The gateway's OpenAPI document, as the gateway serves it (explicit config: no schemathesis.toml)."""
    return schemathesis.openapi.from_url(fuzz_gateway.url + "/openapi.json", config=schemathesis.Config())


def cheapen(label: str, body: Any, max_steps: int) -> None:
    """A valid step count on a generation route lowered to STEPS (absent: the default, 30, too)."""
    if label not in GENERATION_ROUTES or not isinstance(body, dict):
        return
    steps = body.get("steps", 30)
    if type(steps) is int and 1 <= steps <= max_steps:
        body["steps"] = STEPS


def check_response(label: str, path: str, response: schemathesis.Response) -> None:
    """Never a 5xx; a 4xx is JSON with a message that names the field it blames."""
    request = response.request
    sent = request.body if isinstance(request.body, bytes) else str(request.body).encode()
    where = f"{request.method} {request.url} {sent[:300]!r} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, where
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), where
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), where
    error = body["error"]
    message = error.get("message")
    assert isinstance(message, str) and message.strip(), where
    assert isinstance(error.get("type"), str) and error["type"], where
    if path == OPENAI_PATH:
        assert set(error) >= {"message", "type", "param", "code"}, where
        blamed = error["param"]
    else:
        blamed = error.get("field")
    if blamed and response.status_code in (400, 422):  # a refused value: the message names its field
        assert blamed.split(".")[0] in message, f"the message does not name {blamed!r}: {where}"


def fuzz(schema: OpenApiSchema, url: str, label: str, mode: GenerationMode, jobs: list[str]) -> int:
    """Send the generated cases of one route and mode; returns how many were sent. The ids of the
    jobs it created go to `jobs`."""
    operation = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)
    max_steps = requests.get(url + "/v1/info", timeout=30).json()["limits"]["max_steps"]
    sent = 0
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES.get(label, DEFAULT_EXAMPLES),
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        cheapen(label, case.body, max_steps)
        response = case.call(base_url=url, session=session, timeout=120)
        sent += 1
        check_response(label, operation.path, response)
        if label == "POST /v1/jobs" and response.status_code == 202:
            jobs.append(response.json()["id"])

    try:
        run()
    except Unsatisfiable:
        # nothing to break: every parameter is a path string, and a path carries nothing but strings
        assert mode is GenerationMode.NEGATIVE and sent == 0, label
    return sent


def negatable(schema: OpenApiSchema, label: str) -> bool:
    """A route with something to break: parameters or a body."""
    operation = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)
    return bool(list(operation.iter_parameters())) or bool(operation.body)


def follow_job(url: str, job_id: str, cancel: bool) -> str:
    """A job the fuzz created, through the routes a client follows it by: its events until the last
    one (or a cancel first), then its status. Returns its final status."""
    if cancel:
        response = requests.delete(f"{url}/v1/jobs/{job_id}", timeout=30)
        assert response.status_code == 200, response.text
    with requests.get(f"{url}/v1/jobs/{job_id}/events", stream=True, timeout=60) as events:
        assert events.status_code == 200, events.text
        names = [
            line[len("event: ") :]
            for line in events.iter_lines(decode_unicode=True)
            if line.startswith("event: ")
        ]
    assert names and names[0] == "queued" and names[-1] in JOB_TERMINAL, names
    response = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["status"] == names[-1], (status, names)
    assert status["status"] != "failed", f"a job the gateway accepted failed: {status['error']}"
    return str(status["status"])


def test_every_route_from_the_openapi_document(schema: OpenApiSchema, fuzz_gateway: GatewayProcess) -> None:
    labels = [r.ok().label for r in schema.get_all_operations()]
    assert set(EXAMPLES) <= set(labels), f"routes gone from the document: {set(EXAMPLES) - set(labels)}"
    counts: Counter[str] = Counter()
    jobs: list[str] = []
    started = time.monotonic()
    for label in labels:
        modes = [GenerationMode.POSITIVE]
        if negatable(schema, label):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            route_started = time.monotonic()
            sent = fuzz(schema, fuzz_gateway.url, label, mode, jobs)
            counts[label] += sent
            seconds = time.monotonic() - route_started
            log.info("%-32s %-8s %4d cases, %.1f s", label, mode.value, sent, seconds)
    log.info("%d cases over %d routes in %.1f s", counts.total(), len(labels), time.monotonic() - started)
    assert all(counts[label] > 0 for label in labels), counts
    assert counts.total() >= MIN_CASES, counts
    # the jobs it created run to the end (or are cancelled) and read back over every jobs route
    assert jobs, "no generated job was accepted"
    finals = Counter(follow_job(fuzz_gateway.url, job_id, cancel=i % 2 == 1) for i, job_id in enumerate(jobs))
    log.info("%d jobs created by the fuzz, followed to the end: %s", len(jobs), dict(finals))
    # the gateway is still up and still generates, and its log shows no exception a handler turned
    # into a 4xx or a background task (a job) died of
    response = requests.post(
        fuzz_gateway.url + "/v1/generate", json={"prompt": "a cat", "steps": STEPS, "seed": 1}, timeout=60
    )
    assert response.status_code == 200 and len(response.json()["images"]) == 1, response.text
    assert fuzz_gateway.log_file is not None
    text = Path(fuzz_gateway.log_file).read_text(errors="replace")
    assert "Traceback" not in text, text[max(0, text.index("Traceback") - 2000) :][:6000]
